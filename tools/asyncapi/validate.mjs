// Validates an AsyncAPI document with the AsyncAPI initiative's parser, resolving its
// relative $refs (the JSON Schemas in schema/) from the document's own folder. Prints each
// diagnostic; exits 1 when any is an error (severity 0), 2 when the file cannot be read.
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Parser, fromFile } from '@asyncapi/parser';

const file = process.argv[2];
if (!file) {
  console.error('usage: node validate.mjs DOCUMENT');
  process.exit(2);
}
try {
  readFileSync(file);
} catch (e) {
  console.error(`cannot read ${file}: ${e.message}`);
  process.exit(2);
}
const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, resolve(file)).parse();
let errors = 0;
for (const d of diagnostics) {
  const where = (d.path || []).join('.');
  console.log(`${['error', 'warning', 'info', 'hint'][d.severity] ?? d.severity}: ${where}: ${d.message}`);
  if (d.severity === 0) errors += 1;
}
if (!document || errors > 0) {
  console.log(`invalid: ${errors} error(s)`);
  process.exit(1);
}
const channels = document.channels().all().map((c) => c.address());
console.log(`valid: AsyncAPI ${document.version()}, channels ${channels.join(', ')}`);
