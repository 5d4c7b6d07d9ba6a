import { randomBytes } from "node:crypto";
import { createWriteStream } from "node:fs";
import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import type { ImageChunk__Output } from "../../gen/capsule/v1/ImageChunk.js";
import type { ImagesHandlers } from "../../gen/capsule/v1/Images.js";
import type { PullImageRequest__Output } from "../../gen/capsule/v1/PullImageRequest.js";
import type { PushImageResponse } from "../../gen/capsule/v1/PushImageResponse.js";
import { invalidArgument } from "../../errors.js";
import type { ImageInfo, Images } from "../runtime/images.js";
import { clientStream, needRuntime, type RpcDeps, unary } from "./rpc.js";

/** ImageServiceDeps: `images` returns the image store, or undefined while it is not available (no fabric, containerd starting). */
export interface ImageServiceDeps extends RpcDeps {
  images: () => Images | undefined;
  /** stateDir holds pushed archives while they are imported (`<stateDir>/tmp`). */
  stateDir: string;
}

const SVC = "/capsule.v1.Images";

const toImage = (i: ImageInfo) => ({ ref: i.name, digest: i.digest, size: String(i.size) });

/** imageService builds the handlers of capsule.v1.Images (thin: the store is src/node/runtime/images.ts). */
export function imageService(d: ImageServiceDeps): ImagesHandlers {
  return {
    List: unary(d, `${SVC}/List`, async () => ({
      images: (await needRuntime(d.images()).list()).map(toImage),
    })),
    Pull: unary(d, `${SVC}/Pull`, async (req: PullImageRequest__Output): Promise<PushImageResponse> => {
      if (!req.ref) throw invalidArgument("ref", "is required", "capsulectl image pull REF");
      return { images: [toImage(await needRuntime(d.images()).pull(req.ref, { plainHttp: req.plainHttp }))] };
    }),
    Push: clientStream(d, `${SVC}/Push`, async (stream: AsyncIterable<ImageChunk__Output>) => {
      const images = needRuntime(d.images());
      const dir = join(d.stateDir, "tmp");
      await mkdir(dir, { recursive: true, mode: 0o700 });
      const file = join(dir, `push-${randomBytes(6).toString("hex")}.tar`);
      try {
        let expected: bigint | undefined;
        let got = 0n;
        async function* data() {
          for await (const c of stream) {
            if (expected === undefined && c.totalSize) {
              if (!/^\d+$/.test(c.totalSize))
                throw invalidArgument("total_size", `"${c.totalSize}" is not a size`);
              expected = BigInt(c.totalSize);
            }
            got += BigInt(c.data.length);
            if (c.data.length) yield c.data;
          }
        }
        await pipeline(data, createWriteStream(file, { mode: 0o600 }));
        if (got === 0n) throw invalidArgument("archive", "is empty");
        if (expected !== undefined && expected !== got) {
          throw invalidArgument(
            "archive",
            `received ${got} bytes of ${expected}`,
            "the upload was cut short; push again",
          );
        }
        const res: PushImageResponse = { images: (await images.import(file)).map(toImage) };
        return res;
      } finally {
        await rm(file, { force: true });
      }
    }),
  };
}
