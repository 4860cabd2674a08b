// Builds a JavaScript fetch handler into a component with componentize-js (no WIT given:
// the default world, whose fetch-event feature exports wasi:http/incoming-handler).
// Usage: node componentize.mjs NPM_PREFIX SOURCE.js OUT.wasm, where NPM_PREFIX is the
// directory componentize-js was installed into (ESM imports ignore NODE_PATH).
import { writeFile } from 'node:fs/promises';
import { resolve, join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [prefix, source, out] = process.argv.slice(2);
const entry = join(prefix, 'node_modules/@bytecodealliance/componentize-js/src/componentize.js');
const { componentize } = await import(pathToFileURL(entry).href);
// An empty world: the fetch-event feature adds the wasi:http/incoming-handler export.
const witWorld = 'package local:function; world function {}';
const { component } = await componentize({ sourcePath: resolve(source), witWorld });
await writeFile(out, component);
