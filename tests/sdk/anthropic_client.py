"""The official Anthropic SDK against Sluice's /v1/messages ingress (argv: base URL, key, model)."""
import sys

import anthropic

base_url, key, model = sys.argv[1:4]
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)

message = client.messages.create(
    model=model,
    max_tokens=64,
    system="Be brief.",
    messages=[{"role": "user", "content": "hello"}],
)
assert message.type == "message", message
assert message.content[0].type == "text", message
text = message.content[0].text
assert text, message
assert message.usage.output_tokens > 0, message

streamed = []
with client.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as stream:
    for chunk in stream.text_stream:
        streamed.append(chunk)
    final = stream.get_final_message()
assert "".join(streamed) == final.content[0].text, (streamed, final)
assert final.stop_reason == "end_turn", final

count = client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hello world"}])
assert count.input_tokens > 0, count

try:
    client.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected an error for an unknown model")
except anthropic.NotFoundError as e:
    assert "no-such-model" in str(e), e

print("OK", text, "|", "".join(streamed))
