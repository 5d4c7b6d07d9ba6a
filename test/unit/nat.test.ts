import t from "tap";
import { FakeRunner } from "../../src/node/host/runner.js";
import {
  compileNat,
  FABRIC_CIDR,
  listeningPorts,
  NftPortForwarder,
  type NatConfig,
  normalizeRuleset,
  renderNatTable,
} from "../../src/node/workloads/nat.js";
import type { HostPortForward } from "../../src/node/workloads/ports.js";

const cfg = (workloadAddresses: string[], forwards: HostPortForward[]): NatConfig => ({
  workloadAddresses,
  forwards,
  fabricIface: "capsule0",
  fabricCidr: FABRIC_CIDR,
});

const web: HostPortForward = {
  protocol: "tcp",
  hostPort: 18080,
  address: "100.64.1.2",
  port: 8080,
  workload: "web",
};
const dns: HostPortForward = {
  protocol: "udp",
  hostPort: 53,
  address: "100.64.1.10",
  port: 5353,
  workload: "dns",
};
const tls: HostPortForward = {
  protocol: "tcp",
  hostPort: 443,
  address: "100.64.1.2",
  port: 8443,
  workload: "web",
};

const CHAINS = `	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local dnat ip to meta l4proto . th dport map @forwards
	}

	chain output {
		type nat hook output priority -100; policy accept;
		fib daddr type local dnat ip to meta l4proto . th dport map @forwards
	}

	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr @workloads ip daddr != 100.64.0.0/10 oifname != "capsule0" masquerade
	}
}
`;

t.test("compileNat golden: empty inputs", async (t) => {
  t.equal(
    compileNat(cfg([], [])),
    `table ip capsule_nat {
}
delete table ip capsule_nat
table ip capsule_nat {
	set workloads {
		type ipv4_addr
	}

	map forwards {
		type inet_proto . inet_service : ipv4_addr . inet_service
	}

${CHAINS}`,
  );
});

t.test("compileNat golden: sorted addresses and forwards, duplicates of addresses dropped", async (t) => {
  const text = compileNat(cfg(["100.64.1.10", "100.64.1.2", "100.64.0.200", "100.64.1.2"], [dns, web, tls]));
  t.equal(
    text,
    `table ip capsule_nat {
}
delete table ip capsule_nat
table ip capsule_nat {
	set workloads {
		type ipv4_addr
		elements = { 100.64.0.200, 100.64.1.2, 100.64.1.10 }
	}

	map forwards {
		type inet_proto . inet_service : ipv4_addr . inet_service
		elements = { tcp . 443 : 100.64.1.2 . 8443, tcp . 18080 : 100.64.1.2 . 8080, udp . 53 : 100.64.1.10 . 5353 }
	}

${CHAINS}`,
  );
  t.equal(
    compileNat(cfg(["100.64.1.2", "100.64.1.10", "100.64.0.200"], [tls, web, dns])),
    text,
    "order-independent",
  );
  t.equal(text.match(/masquerade/g)?.length, 1, "one masquerade rule, and it is the guarded one");
  t.match(text, /ip saddr @workloads ip daddr != 100\.64\.0\.0\/10 oifname != "capsule0" masquerade\n/);
});

t.test("compileNat refuses bad input before anything reaches nft", async (t) => {
  t.throws(() => compileNat(cfg(["100.64.1.300"], [])), { code: "CAPSULE_INVALID_ARGUMENT" });
  t.throws(() => compileNat(cfg([], [{ ...web, hostPort: 0 }])), { code: "CAPSULE_INVALID_ARGUMENT" });
  t.throws(() => compileNat(cfg([], [{ ...web, port: 70000 }])), { code: "CAPSULE_INVALID_ARGUMENT" });
  t.throws(() => compileNat(cfg([], [{ ...web, address: "web" }])), { code: "CAPSULE_INVALID_ARGUMENT" });
  t.throws(() => compileNat(cfg([], [web, { ...web, address: "100.64.1.3" }])), {
    code: "CAPSULE_INVALID_ARGUMENT",
    message: /tcp\/18080 is forwarded twice/,
  });
  t.throws(() => compileNat({ ...cfg([], []), fabricIface: 'x" accept' }), {
    code: "CAPSULE_INVALID_ARGUMENT",
  });
  t.throws(() => compileNat({ ...cfg([], []), fabricCidr: "100.64.0.0" }), {
    code: "CAPSULE_INVALID_ARGUMENT",
  });
  t.throws(() => compileNat(cfg([], [{ ...web, protocol: "sctp" as "tcp" }])), {
    code: "CAPSULE_INVALID_ARGUMENT",
  });
});

t.test("NftPortForwarder: check then apply, once per change", async (t) => {
  const fake = new FakeRunner().on((argv) =>
    argv.join(" ") === "nft list table ip capsule_nat"
      ? { exitCode: 1, stderr: "No such file or directory" }
      : undefined,
  );
  const f = new NftPortForwarder({ runner: fake, fabricIface: "capsule0" });
  await f.set(["100.64.1.2"], [web]);
  t.same(fake.commands, ["nft list table ip capsule_nat", "nft --check -f -", "nft -f -"]);
  const want = compileNat(cfg(["100.64.1.2"], [web]));
  t.same(fake.inputs, [undefined, want, want], "the checked text is the applied text");
  await f.set(["100.64.1.2"], [web]);
  t.equal(fake.commands.length, 3, "unchanged: nothing runs");
  await f.set(["100.64.1.2"], []);
  t.same(fake.commands.slice(3), ["nft --check -f -", "nft -f -"], "a change applies without re-listing");
});

t.test("NftPortForwarder: a table already in place (capsuled restart) is not re-applied", async (t) => {
  // nft wraps long element lists; whitespace differences do not count.
  const listed = renderNatTable(cfg(["100.64.1.2", "100.64.1.3"], [web])).replace(
    "100.64.1.2, 100.64.1.3",
    "100.64.1.2,\n\t\t\t     100.64.1.3",
  );
  const fake = new FakeRunner().on((argv) => (argv[1] === "list" ? { stdout: listed } : undefined));
  const f = new NftPortForwarder({ runner: fake, fabricIface: "capsule0" });
  await f.set(["100.64.1.3", "100.64.1.2"], [web]);
  t.same(fake.commands, ["nft list table ip capsule_nat"]);
});

t.test("NftPortForwarder: a failed check applies nothing and the next set retries", async (t) => {
  let fail = true;
  const fake = new FakeRunner()
    .on((argv) => (argv[1] === "list" ? { exitCode: 1 } : undefined))
    .on((argv) =>
      argv[1] === "--check" && fail ? { exitCode: 1, stderr: "Error: syntax error" } : undefined,
    );
  const f = new NftPortForwarder({ runner: fake, fabricIface: "capsule0" });
  await t.rejects(f.set([], []), { code: "CAPSULE_COMMAND_FAILED", message: /syntax error/ });
  t.notOk(fake.commands.includes("nft -f -"), "nft -f never ran");
  fail = false;
  await f.set([], []);
  t.same(fake.commands.slice(-2), ["nft --check -f -", "nft -f -"]);
});

t.test("portInUse parses ss output", async (t) => {
  const tcp = [
    "LISTEN 0      4096         0.0.0.0:22        0.0.0.0:*",
    "LISTEN 0      511        127.0.0.1%lo:8080      0.0.0.0:*",
    "LISTEN 0      4096            [::]:50000        [::]:*",
    "LISTEN 0      128                *:9100            *:*",
    "",
  ].join("\n");
  t.same(
    [...listeningPorts(tcp)].sort((a, b) => a - b),
    [22, 8080, 9100, 50000],
  );
  const fake = new FakeRunner().on((argv) => (argv[1] === "-Hltn" ? { stdout: tcp } : { stdout: "" }));
  const f = new NftPortForwarder({ runner: fake, fabricIface: "capsule0" });
  t.equal(await f.portInUse("tcp", 50000), true);
  t.equal(await f.portInUse("tcp", 18080), false);
  t.equal(await f.portInUse("udp", 22), false);
  t.same(fake.commands, ["ss -Hltn", "ss -Hltn", "ss -Hlun"]);
  await t.rejects(f.portInUse("tcp", 0), { code: "CAPSULE_INVALID_ARGUMENT" });
});

t.test("normalizeRuleset ignores nft's element order and wrapping, nothing else", async (t) => {
  const a = renderNatTable(cfg(["100.64.1.2"], [web, tls, dns]));
  const hashOrder = a.replace(
    "tcp . 443 : 100.64.1.2 . 8443, tcp . 18080 : 100.64.1.2 . 8080, udp . 53 : 100.64.1.10 . 5353",
    "udp . 53 : 100.64.1.10 . 5353,\n\t\t\t     tcp . 443 : 100.64.1.2 . 8443, tcp . 18080 : 100.64.1.2 . 8080",
  );
  t.not(hashOrder, a);
  t.equal(normalizeRuleset(hashOrder), normalizeRuleset(a));
  t.not(normalizeRuleset(renderNatTable(cfg(["100.64.1.2"], [web, tls]))), normalizeRuleset(a));
});
