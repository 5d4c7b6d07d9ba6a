// detectAccel over a FakeRunner: KVM works; KVM aborts (host CPU) then runs too slowly (qemu64)
// and TCG wins; nothing works; QEMU missing. Plus the canary firmware bytes and the probe argv.
import t from "tap";
import { FakeRunner, type RunResult } from "../../src/node/host/runner.js";
import {
  CANARY_EXIT,
  canaryFirmware,
  detectAccel,
  judgeProbe,
  lastWords,
  parseQueryKvm,
  PROBE_INPUT,
  probeArgv,
} from "../../src/node/runtime/qemu-accel.js";

const GREETING =
  '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}';
const qmpOut = (kvmEnabled: boolean) =>
  [
    GREETING,
    '{"return": {}}',
    `{"return": {"enabled": ${kvmEnabled}, "present": true}}`,
    '{"return": {}}',
    "",
  ].join("\n");
const VERSION = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n";
const MSR_ABORT =
  "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n" +
  "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n";
const FW = "/fw/canary.bin";

/** cpuOf returns "accel/cpu" of a probe argv, or "version". */
const key = (argv: readonly string[]) =>
  argv.includes("--version")
    ? "version"
    : `${argv[argv.indexOf("-accel") + 1]}/${argv[argv.indexOf("-cpu") + 1]}`;

/** fake answers per probe key; the clock advances by each answer's `ms`. */
function fake(answers: Record<string, Partial<RunResult> & { ms?: number }>) {
  let clock = 0;
  const runner = new FakeRunner().on((argv) => {
    const a = answers[key(argv)];
    if (!a) return undefined;
    clock += a.ms ?? 40;
    const { ms: _ms, ...res } = a;
    return res;
  });
  return { runner, now: () => clock };
}

t.test("canary firmware: 64 KiB, store loop at 0, reset vector jumps there", async (t) => {
  const fw = canaryFirmware();
  t.equal(fw.length, 0x10000);
  t.same(
    [...fw.subarray(0, 0x18)],
    [
      0x66, 0xb9, 0x00, 0x00, 0x10, 0x00, 0x31, 0xdb, 0x89, 0x0f, 0x83, 0xc3, 0x02, 0x66, 0x49, 0x75, 0xf7,
      0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd,
    ],
  );
  t.same([...fw.subarray(0xfff0, 0xfff3)], [0xe9, 0x0d, 0x00]);
  t.equal(CANARY_EXIT, 85);
});

t.test("probe argv is paused microvm with the canary firmware and QMP on stdio", async (t) => {
  t.equal(
    probeArgv("qemu-system-x86_64", { accel: "kvm", cpu: "host" }, FW).join(" "),
    "qemu-system-x86_64 -accel kvm -cpu host -machine microvm,x-option-roms=off,rtc=off -m 16M -nodefaults " +
      "-no-user-config -display none -S -bios /fw/canary.bin -device isa-debug-exit,iobase=0xf4,iosize=0x01 -qmp stdio",
  );
  t.equal(PROBE_INPUT, '{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n{"execute":"cont"}\n');
});

t.test("kvm works: first candidate wins, one probe, QMP fed on stdin", async (t) => {
  const { runner, now } = fake({
    version: { stdout: VERSION },
    "kvm/host": { exitCode: CANARY_EXIT, stdout: qmpOut(true), ms: 45 },
  });
  const got = await detectAccel(runner, { firmwarePath: FW, now });
  t.equal(got.accel, "kvm");
  t.equal(got.cpu, "host");
  t.match(got.reason, /^kvm \(-cpu host\) ran the canary guest in 45 ms \(QEMU emulator version 7\.2\.22/);
  t.same(runner.commands, [
    "qemu-system-x86_64 --version",
    probeArgv("qemu-system-x86_64", { accel: "kvm", cpu: "host" }, FW).join(" "),
  ]);
  t.equal(runner.inputs[1], PROBE_INPUT);
});

t.test("kvm fails (abort, then too slow), tcg runs", async (t) => {
  const { runner, now } = fake({
    version: { stdout: VERSION },
    "kvm/host": { exitCode: -1, stdout: GREETING + "\n", stderr: MSR_ABORT, ms: 33 },
    "kvm/qemu64": {
      exitCode: CANARY_EXIT,
      stdout: qmpOut(true),
      stderr:
        "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]\n",
      ms: 3094,
    },
    "tcg/max": { exitCode: CANARY_EXIT, stdout: qmpOut(false), ms: 36 },
  });
  const got = await detectAccel(runner, { firmwarePath: FW, now });
  t.equal(got.accel, "tcg");
  t.equal(got.cpu, "max");
  t.match(got.reason, "tcg (-cpu max) ran the canary guest in 36 ms");
  t.match(
    got.reason,
    "kvm (-cpu host): killed, crashed or timed out after 33 ms: error: failed to set MSR 0x10a to 0x69",
  );
  t.match(got.reason, "kvm (-cpu qemu64): too slow: the canary guest took 3094 ms (limit 1000 ms");
  t.same(
    runner.commands.map((c) => c.split(" ").slice(0, 5).join(" ")),
    [
      "qemu-system-x86_64 --version",
      "qemu-system-x86_64 -accel kvm -cpu host",
      "qemu-system-x86_64 -accel kvm -cpu qemu64",
      "qemu-system-x86_64 -accel tcg -cpu max",
    ],
  );
  // a more generous limit accepts the slow KVM
  const again = fake({ version: { stdout: VERSION }, "kvm/host": { exitCode: CANARY_EXIT, ms: 3000 } });
  t.equal((await detectAccel(again.runner, { firmwarePath: FW, now: again.now, slowMs: 5000 })).accel, "kvm");
});

t.test("nothing runs the canary: none, with every candidate's reason", async (t) => {
  const { runner, now } = fake({
    version: { stdout: VERSION },
    "kvm/host": {
      exitCode: 1,
      stderr:
        "qemu-system-x86_64: Could not access KVM kernel module: No such file or directory\nqemu-system-x86_64: failed to initialize kvm: No such file or directory\n",
    },
    "kvm/qemu64": {
      exitCode: 1,
      stderr: "qemu-system-x86_64: failed to initialize kvm: No such file or directory\n",
    },
    "tcg/max": { exitCode: 0, stdout: qmpOut(false) },
  });
  const got = await detectAccel(runner, { firmwarePath: FW, now });
  t.equal(got.accel, "none");
  t.equal(got.cpu, undefined);
  t.match(got.reason, "kvm (-cpu host): exit 1: failed to initialize kvm: No such file or directory");
  t.match(got.reason, "tcg (-cpu max): exited 0 before the canary ran");
});

t.test("qemu missing: none, with the apt-get hint, and no probe runs", async (t) => {
  const { runner, now } = fake({ version: { exitCode: -1, stderr: "" } });
  const got = await detectAccel(runner, { firmwarePath: FW, now });
  t.same(got, {
    accel: "none",
    cpu: undefined,
    reason: "qemu-system-x86_64 is not usable (not found); install it: apt-get install qemu-system-x86",
  });
  t.equal(runner.commands.length, 1);
  const thrower = { run: async () => Promise.reject(new Error("spawn qemu-system-x86_64 ENOENT")) };
  t.match(
    (await detectAccel(thrower, { firmwarePath: FW })).reason,
    /ENOENT.*apt-get install qemu-system-x86/,
  );
});

t.test("without firmwarePath the probe writes the canary to a temporary file and removes it", async (t) => {
  let seen: Uint8Array | undefined;
  let path = "";
  const { readFile, access } = await import("node:fs/promises");
  const runner = new FakeRunner().on((argv) =>
    argv.includes("--version") ? { stdout: VERSION } : undefined,
  );
  const spy = {
    async run(
      argv: readonly string[],
      opts?: { input?: string; timeoutMs?: number; allowFailure?: boolean },
    ) {
      if (argv.includes("-bios")) {
        path = argv[argv.indexOf("-bios") + 1]!;
        seen = new Uint8Array(await readFile(path));
        return { exitCode: CANARY_EXIT, stdout: "", stderr: "" };
      }
      return runner.run(argv, opts);
    },
  };
  t.equal((await detectAccel(spy)).accel, "kvm");
  t.same(seen, canaryFirmware());
  await t.rejects(access(path), "removed afterwards");
});

t.test("judgeProbe and parsing helpers", async (t) => {
  t.same(parseQueryKvm(qmpOut(true)), { enabled: true, present: true });
  t.equal(parseQueryKvm(GREETING + "\nnot json\n"), undefined);
  t.equal(lastWords(MSR_ABORT), "error: failed to set MSR 0x10a to 0x69");
  t.equal(lastWords("qemu-system-x86_64: warning: x\n"), "");
  const kvm = { accel: "kvm", cpu: "host" } as const;
  t.equal(judgeProbe(kvm, { exitCode: CANARY_EXIT, stdout: qmpOut(true), stderr: "" }, 50, 1000), undefined);
  t.match(
    judgeProbe(kvm, { exitCode: CANARY_EXIT, stdout: qmpOut(false), stderr: "" }, 50, 1000),
    "query-kvm reports KVM disabled",
  );
  t.match(
    judgeProbe(
      { accel: "tcg", cpu: "max" },
      { exitCode: CANARY_EXIT, stdout: qmpOut(true), stderr: "" },
      50,
      1000,
    ),
    "query-kvm reports KVM enabled",
  );
  t.equal(
    judgeProbe({ accel: "tcg", cpu: "max" }, { exitCode: CANARY_EXIT, stdout: "", stderr: "" }, 9000, 1000),
    undefined,
    "tcg is not held to slowMs",
  );
  t.equal(judgeProbe(kvm, { exitCode: 134, stdout: "", stderr: "" }, 50, 1000), "aborted");
});
