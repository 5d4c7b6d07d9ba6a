import { writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { ClaimWindow } from "../../src/node/claim.js";
import { FakeClock } from "../../src/node/host/clock.js";
import { MIGRATIONS } from "../../src/node/store/migrations.js";
import { Store } from "../../src/node/store/store.js";
import { removeDir, tempDir } from "../helpers/capsuled.js";

t.test("store: WAL, synchronous=FULL, migrated, persistent", async (t) => {
  const dir = tempDir();
  t.teardown(() => removeDir(dir));
  const path = join(dir, "state.db");
  const s = Store.open(path);
  t.equal(s.db.pragma("journal_mode", { simple: true }), "wal");
  t.equal(s.db.pragma("synchronous", { simple: true }), 2, "FULL");
  t.equal(s.schemaVersion, MIGRATIONS.at(-1)?.version);
  s.setMeta("k", "v1");
  s.setMeta("k", "v2");
  t.equal(s.useToken("j1", 10), true);
  t.equal(s.useToken("j1", 10), false);
  s.close();
  const s2 = Store.open(path);
  t.equal(s2.getMeta("k"), "v2");
  t.equal(s2.useToken("j1", 10), false, "used token ids survive reopen");
  t.equal(s2.pruneTokens(11), 1);
  t.equal(s2.useToken("j1", 10), true, "pruned after expiry");
  s2.close();
});

t.test("store: a corrupt database is refused with a clear error", async (t) => {
  const dir = tempDir();
  t.teardown(() => removeDir(dir));
  const path = join(dir, "state.db");
  writeFileSync(path, "this is not sqlite".repeat(1000));
  t.throws(() => Store.open(path), { code: "CAPSULE_STATE_CORRUPT" });
});

t.test("store: a newer schema is refused", async (t) => {
  const dir = tempDir();
  t.teardown(() => removeDir(dir));
  const path = join(dir, "state.db");
  const s = Store.open(path);
  s.db.pragma("user_version = 999");
  s.close();
  t.throws(() => Store.open(path), { code: "CAPSULE_STATE_CORRUPT" });
});

t.test("claim window: open, then closed for good by timer or by a claim", async (t) => {
  const store = Store.open(":memory:");
  const clock = new FakeClock();
  const w = new ClaimWindow(store, clock, 30 * 60_000);
  t.equal(w.isOpen(), true);
  t.equal(w.closesAt(), clock.now() + 30 * 60_000);
  clock.advance(30 * 60_000);
  t.equal(w.isOpen(), false);
  t.throws(() => w.assertOpen(), { code: "CAPSULE_CLAIM_CLOSED" });
  // A new window object (a restart) with a longer duration does not reopen it.
  t.equal(new ClaimWindow(store, clock, 10 * 3600_000).isOpen(), false);

  const store2 = Store.open(":memory:");
  const w2 = new ClaimWindow(store2, clock, 60_000);
  store2.putOperator({ id: "k", name: "a", publicKeyJwk: "{}", addedAt: "", addedBy: "claim" });
  t.equal(w2.isOpen(), false, "closed once an operator exists");
  store2.deleteOperator("k");
  t.equal(w2.isOpen(), false, "stays closed even if the operators go away");
});
