// A fetch event handler (StarlingMonkey's `fetch-event` feature): componentize-js builds it
// into a component exporting wasi:http/incoming-handler.
addEventListener('fetch', (event) => {
  console.log(`hello-js: ${new URL(event.request.url).pathname}`);
  event.respondWith(new Response('hello from js\n', { headers: { 'content-type': 'text/plain' } }));
});
