// lab/qemu/guest.ts's pure parts: the kernel command line keys (capsule.gwmac, capsule.vol) and
// the TCG clock hints read from /proc/cpuinfo.
import t from "tap";
import { guestCmdline, tcgClockCmdline } from "../../lab/qemu/guest.js";

t.test("guestCmdline: gateway MAC and volumes become capsule.* keys", async (t) => {
  const c = guestCmdline({
    ip: "100.64.5.2/32",
    gw: "169.254.1.1",
    gwmac: "ee:ee:ee:ee:ee:ee",
    vols: ["data:/data", "logs:/var/log/app"],
  });
  t.match(
    c,
    / capsule\.ip=100\.64\.5\.2\/32 capsule\.gw=169\.254\.1\.1 capsule\.gwmac=ee:ee:ee:ee:ee:ee capsule\.vol=data:\/data capsule\.vol=logs:\/var\/log\/app$/,
  );
  t.notMatch(guestCmdline(), /capsule\./, "nothing unset appears");
});

t.test("tcgClockCmdline: TSC kHz from cpu MHz, lpj from BogoMIPS at HZ 250", async (t) => {
  const cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2596.122\nbogomips\t: 5192.24\n";
  t.equal(tcgClockCmdline(cpuinfo), "tsc_early_khz=2596122 lpj=10384480");
  t.equal(tcgClockCmdline(cpuinfo, 1000), "tsc_early_khz=2596122 lpj=2596120");
  t.equal(tcgClockCmdline("processor\t: 0\n"), "", "nothing usable: nothing");
});
