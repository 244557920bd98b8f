// A Node.js agent for the tests: built-in fetch only, no packages. Node 20's fetch ignores
// HTTPS_PROXY, so it reaches tokencap only through the base-URL variables.
//
//   node node_agent.mjs anthropic|openai-stream|gemini OUT_FILE
import { appendFileSync } from "node:fs";

const [kind, out] = process.argv.slice(2);

async function call() {
  if (kind === "anthropic") {
    const response = await fetch(`${process.env.ANTHROPIC_BASE_URL}/v1/messages`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        "x-api-key": "test",
        "anthropic-version": "2023-06-01",
      },
      body: JSON.stringify({
        model: "claude-sonnet-4-5-20250929",
        max_tokens: 100,
        messages: [{ role: "user", content: "hello from node" }],
      }),
    });
    const body = await response.json();
    return { status: response.status, usage: body.usage };
  }
  if (kind === "openai-stream") {
    const response = await fetch(`${process.env.OPENAI_BASE_URL}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "Bearer test" },
      body: JSON.stringify({
        model: "gpt-4o-2024-08-06",
        stream: true,
        stream_options: { include_usage: true },
        messages: [{ role: "user", content: "hello from node" }],
      }),
    });
    const text = await response.text();
    const chunks = text.split("\n\n").filter((e) => e.startsWith("data: {"));
    const last = JSON.parse(chunks[chunks.length - 1].slice(6));
    return { status: response.status, usage: last.usage, events: chunks.length };
  }
  const base = process.env.GOOGLE_GEMINI_BASE_URL;
  const response = await fetch(
    `${base}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse`,
    {
      method: "POST",
      headers: { "content-type": "application/json", "x-goog-api-key": "test" },
      body: JSON.stringify({ contents: [{ parts: [{ text: "hello from node" }] }] }),
    },
  );
  const text = await response.text();
  return { status: response.status, events: text.split("\n\n").filter(Boolean).length };
}

const outcome = await call();
appendFileSync(out, JSON.stringify(outcome) + "\n");
process.exit(outcome.status === 200 ? 0 : 1);
