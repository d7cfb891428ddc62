// One chat completion with the `openai` npm package, made the way a Node agent makes it.
//   node node_client.mjs base-url   COOLDOWN_BASE_URL only (the reverse proxy): no proxy, no CA
//   node node_client.mjs proxy      through COOLDOWN_PROXY with undici's ProxyAgent, since
//                                   Node's built-in fetch ignores HTTPS_PROXY; the CA comes
//                                   from NODE_EXTRA_CA_CERTS
// Prints one JSON line for the test (tests/e2e/test_ways_in_e2e.py) to check.
import OpenAI from "openai";

const way = process.argv[2];
const options = {
  apiKey: process.env.COOLDOWN_API_KEY,
  baseURL: process.env.COOLDOWN_BASE_URL,
  maxRetries: 0,
  timeout: 30_000,
};
if (way === "proxy") {
  const { ProxyAgent } = await import("undici");
  options.fetchOptions = { dispatcher: new ProxyAgent(process.env.COOLDOWN_PROXY) };
} else if (way !== "base-url") {
  throw new Error(`unknown way in: ${way}`);
}

const client = new OpenAI(options);
const { data, response } = await client.chat.completions
  .create({
    model: "llama3.1-8b",
    max_completion_tokens: 20,
    messages: [{ role: "user", content: "Say hello from Node." }],
  })
  .withResponse();
console.log(
  JSON.stringify({
    status: response.status,
    estimated: response.headers.get("x-cooldown-estimated-tokens"),
    waited: response.headers.get("x-cooldown-wait"),
    usage: data.usage,
    content: data.choices[0].message.content,
  }),
);
