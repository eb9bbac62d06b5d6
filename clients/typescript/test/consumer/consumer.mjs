// The packed package through `import` (its ES module entry point). Usage: node consumer.mjs ADDRESS DIR
import { createRequire } from "node:module";

import * as api from "@aperture/backup-client";
import { BackupServiceError, connect } from "@aperture/backup-client";

import scenario from "./scenario.cjs";

// One implementation behind both entry points: a class from `import` is the class from `require`.
const required = createRequire(import.meta.url)("@aperture/backup-client");
if (required.BackupServiceError !== BackupServiceError || required.connect !== connect) {
  throw new Error("import and require give different implementations");
}

console.log(await scenario(api, process.argv[2], process.argv[3]));
