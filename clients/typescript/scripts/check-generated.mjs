// Fails when src/gen is not exactly what `npm run generate` makes from ../../protos:
// generated code is never edited by hand, and a proto change must come with its stubs.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const bin = join(root, "node_modules", ".bin");

function files(dir) {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => relative(dir, join(entry.parentPath ?? entry.path, entry.name)))
    .sort();
}

const scratch = mkdtempSync(join(tmpdir(), "fairlane-gen-"));
try {
  execFileSync(join(bin, "buf"), ["generate", "--template", "buf.gen.yaml", "-o", scratch], {
    cwd: root,
    stdio: "inherit",
    env: { ...process.env, PATH: `${bin}:${process.env.PATH}` },
  });
  const fresh = join(scratch, "src", "gen");
  const committed = join(root, "src", "gen");
  const want = files(fresh);
  const have = files(committed);
  const problems = [
    ...want.filter((f) => !have.includes(f)).map((f) => `missing: src/gen/${f}`),
    ...have.filter((f) => !want.includes(f)).map((f) => `not generated: src/gen/${f}`),
    ...want
      .filter((f) => have.includes(f))
      .filter((f) => !readFileSync(join(fresh, f)).equals(readFileSync(join(committed, f))))
      .map((f) => `stale: src/gen/${f}`),
  ];
  if (problems.length > 0) {
    console.error(`${problems.join("\n")}\nsrc/gen is stale: run \`npm run generate\``);
    process.exit(1);
  }
  console.log(`src/gen is up to date (${want.length} files)`);
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
