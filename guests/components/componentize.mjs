// Builds a JavaScript fetch handler into a component with componentize-js: the world
// exports wasi:http/incoming-handler, which StarlingMonkey's fetch-event feature serves.
// Usage: node componentize.mjs NPM_PREFIX SOURCE.js OUT.wasm WIT_DIR WORLD, where NPM_PREFIX
// is the directory componentize-js was installed into (ESM imports ignore NODE_PATH).
import { writeFile } from 'node:fs/promises';
import { resolve, join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [prefix, source, out, witPath, worldName] = process.argv.slice(2);
const entry = join(prefix, 'node_modules/@bytecodealliance/componentize-js/src/componentize.js');
const { componentize } = await import(pathToFileURL(entry).href);
const { component } = await componentize({ sourcePath: resolve(source), witPath, worldName });
await writeFile(out, component);
