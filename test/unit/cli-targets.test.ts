import t from "tap";
import type { CapsuleConfig, Context } from "../../src/cli/config.js";
import { endpointOf, resolveTargets } from "../../src/cli/targets.js";
import { type CapsuleError, ErrorCode } from "../../src/errors.js";

// resolveTargets never looks inside the certificate, so placeholders do.
function ctx(name: string, address: string): Context {
  return { name, address, capsuleId: `id-${name}`, fingerprint: `fp-${name}`, certPem: "PEM", addedAt: "t" };
}
const CFG: CapsuleConfig = {
  currentContext: "b",
  contexts: [ctx("a", "192.0.2.1:50000"), ctx("b", "Box-B.lan:50000"), ctx("c", "[2001:db8::1]:50000")],
};
const names = (cfg: CapsuleConfig, sel: Parameters<typeof resolveTargets>[1], env = {}) =>
  resolveTargets(cfg, sel, env).map((x) => x.name);

t.test("--capsule: names, HOST:PORT and $CAPSULE_HOST, in order, each once", async (t) => {
  t.same(names(CFG, { capsule: "c,a" }), ["c", "a"]);
  t.same(names(CFG, { capsule: "192.0.2.1:50000" }), ["a"]);
  t.same(
    names(CFG, { capsule: "box-b.lan:50000,[2001:db8::1]:50000" }),
    ["b", "c"],
    "host compared case-insensitively",
  );
  t.same(names(CFG, { capsule: "a, 192.0.2.1:50000 ,a" }), ["a"], "deduplicated");
  t.same(names(CFG, { capsule: "$CAPSULE_HOST,a" }, { CAPSULE_HOST: "c" }), ["c", "a"]);
  t.same(names(CFG, { capsule: "$CAPSULE_HOST" }, { CAPSULE_HOST: "c,192.0.2.1:50000" }), ["c", "a"]);
  t.same(names(CFG, { capsule: "a", all: true }, { CAPSULE_HOST: "c" }), ["a"], "--capsule wins");
});

t.test("defaults: --all, then $CAPSULE_HOST, then the current context", async (t) => {
  t.same(names(CFG, { all: true }), ["a", "b", "c"]);
  t.same(names(CFG, {}, { CAPSULE_HOST: "a" }), ["a"]);
  t.same(names(CFG, {}), ["b"]);
  const [only] = resolveTargets(CFG, {}, {});
  t.equal(only?.context, CFG.contexts[1], "carries the context");
  t.same(endpointOf(only!), {
    address: "Box-B.lan:50000",
    certPem: "PEM",
    fingerprint: "fp-b",
    capsuleId: "id-b",
    label: "b",
  });
});

t.test("an unknown name is CAPSULE_UNKNOWN_CONTEXT naming it and the known ones", async (t) => {
  const e = t.throws(() => resolveTargets(CFG, { capsule: "a,zed" }, {})) as unknown as CapsuleError;
  t.equal(e.code, ErrorCode.UnknownContext);
  t.equal(e.message, 'unknown context "zed"');
  t.equal(e.hint, "known contexts: a, b, c");
});

t.test("a HOST:PORT nobody pinned is refused with an adopt hint", async (t) => {
  t.throws(() => resolveTargets(CFG, { capsule: "192.0.2.99:50000" }, {}), {
    code: ErrorCode.UnknownContext,
    message: "no pinned key for 192.0.2.99:50000",
    hint: "capsulectl adopt 192.0.2.99:50000 --name NAME",
  });
  t.throws(() => resolveTargets(CFG, { capsule: "nohostport:" }, {}), { code: ErrorCode.InvalidArgument });
});

t.test("nothing to default to is CAPSULE_NO_CONTEXT with an adopt hint", async (t) => {
  const empty: CapsuleConfig = { currentContext: null, contexts: [] };
  t.throws(() => resolveTargets(empty, {}, {}), {
    code: ErrorCode.NoContext,
    hint: /capsulectl adopt HOST:PORT/,
  });
  t.throws(() => resolveTargets(empty, { all: true }, {}), { code: ErrorCode.NoContext });
  t.throws(() => resolveTargets({ ...CFG, currentContext: null }, {}, {}), {
    code: ErrorCode.NoContext,
    hint: "pick one: capsulectl context use a",
  });
});

t.test("bad lists and an unset $CAPSULE_HOST are invalid arguments", async (t) => {
  t.throws(() => resolveTargets(CFG, { capsule: "a,,b" }, {}), { code: ErrorCode.InvalidArgument });
  t.throws(() => resolveTargets(CFG, { capsule: "" }, {}), { code: ErrorCode.InvalidArgument });
  t.throws(() => resolveTargets(CFG, { capsule: "$CAPSULE_HOST" }, {}), {
    code: ErrorCode.InvalidArgument,
    message: /CAPSULE_HOST is not set/,
  });
});
