// The image builder lives in lab/images.ts (the demo uses it too); tests import it from here.
export * from "../../lab/images.js";
