// shoal dashboard: ES modules, no framework, no build step, no CDN. It reads the API of the node
// that served it (same origin), one module per panel:
//   topology.js    GET /v1/cluster every 1 s: nodes, links, the header's summary
//   instances.js   GET /v1/instances every 1.5 s; Stop is DELETE /v1/instances/{id}
//   placement.js   GET /v1/placement on Preview; Place is POST /v1/instances
//   models.js      GET /v1/models every 15 s, for the model pickers
//   chat.js        POST /v1/chat/completions, streamed
// Text from the server only ever lands in textContent (dom.js builds every element).

import { initKeyDialog } from "./api.js";
import { initChat } from "./chat.js";
import { startInstances } from "./instances.js";
import { refreshModels, renderModelChoices, startModels } from "./models.js";
import { initPlacement } from "./placement.js";
import { renderTopology, startTopology } from "./topology.js";

initKeyDialog(refreshModels);
initChat(); // first: the saved conversation names the model the chat picker should keep
initPlacement();
startTopology();
// Node cards show each instance's shards, and the chat picker marks the ready models.
startInstances(() => {
  renderTopology();
  renderModelChoices();
});
startModels();
