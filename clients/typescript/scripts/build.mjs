// Builds dist/: the CommonJS modules and declarations (tsc), and an ES module entry point that re-exports
// them. One implementation behind both `import` and `require`, so that an error class is the same class
// whichever way a program loaded the package (no dual-package hazard for `instanceof`).
import { spawnSync } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const dist = join(root, "dist");
const require = createRequire(import.meta.url);

rmSync(dist, { recursive: true, force: true });
const tsc = spawnSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", join(root, "tsconfig.build.json")], {
  // stdout stays clean for `npm pack --json`, which runs this as `prepare`.
  stdio: ["ignore", 2, 2],
});
if (tsc.status !== 0) {
  process.exit(tsc.status ?? 1);
}

const names = Object.keys(require(join(dist, "index.js"))).filter((name) => name !== "__esModule").sort();
writeFileSync(
  join(dist, "index.mjs"),
  [
    "// ES module entry point: the CommonJS build's exports, by name (see scripts/build.mjs).",
    'import cjs from "./index.js";',
    "",
    `export const { ${names.join(", ")} } = cjs;`,
    "",
  ].join("\n"),
);
writeFileSync(join(dist, "index.d.mts"), 'export * from "./index.js";\n');
console.error(`dist/ built: CommonJS, declarations, and an ES module entry with ${names.length} exports`);
