"""The official anthropic Python package, unmodified, against sluicegate's
Messages API: streams, a tool round trip, count_tokens, the SDK's own
error classes, and a stream cut and resumed by a re-POST with
Last-Event-ID. Env: SLUICEGATE_URL; MODEL (default echo); KEY; LIMITS
("1": the server runs one generation at a time with no queue, so that a
second one is a 429)."""
import os

import anthropic
import httpx

base = os.environ["SLUICEGATE_URL"]
model = os.environ.get("MODEL", "echo")
on_echo = model == "echo"
key = os.environ.get("KEY", "not-needed")
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)

if os.environ.get("LIMITS") == "1":
    question = {"role": "user", "content": " ".join(f"w{i}" for i in range(200))}
    try:
        anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(model=model, max_tokens=5, messages=[question])
        raise AssertionError("a wrong key is a 401")
    except anthropic.AuthenticationError as err:
        assert err.body["error"]["type"] == "authentication_error", err.body
    with client.messages.stream(model=model, max_tokens=300, messages=[question]) as holding:
        next(iter(holding))
        try:
            client.messages.create(model=model, max_tokens=5, messages=[question])
            raise AssertionError("a full server is a 429")
        except anthropic.RateLimitError as err:
            assert err.body["error"]["type"] == "rate_limit_error", err.body
            assert err.response.headers.get("retry-after"), err.response.headers
    print("anthropic-python limits: ok")
    raise SystemExit(0)

# messages.stream: text_stream and the final message.
with client.messages.stream(model=model, max_tokens=40, messages=[{"role": "user", "content": "python streams words"}]) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert final.content[0].type == "text" and final.content[0].text == text, final
assert final.stop_reason in ("end_turn", "max_tokens"), final.stop_reason
assert final.id.startswith("msg_") and final.usage.output_tokens > 0, final
if on_echo:
    assert text == "python streams words", text

# create, without and with streaming.
answer = client.messages.create(model=model, max_tokens=5, system="be brief", messages=[{"role": "user", "content": "plain json answer here now please"}])
assert answer.type == "message" and answer.role == "assistant", answer
if on_echo:
    assert answer.content[0].text == "plain json answer here now", answer
    assert answer.stop_reason == "max_tokens", answer.stop_reason
if on_echo:
    # A stop sequence ends the answer and is named.
    for stream in (False, True):
        kwargs = dict(model=model, max_tokens=50, stop_sequences=["w3", "nope"], messages=[{"role": "user", "content": "w1 w2 w3 w4"}])
        if stream:
            with client.messages.stream(**kwargs) as s:
                stopped = s.get_final_message()
        else:
            stopped = client.messages.create(**kwargs)
        assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "w3", stopped
        assert stopped.content[0].text == "w1 w2 ", stopped

events = list(client.messages.create(model=model, max_tokens=20, messages=[{"role": "user", "content": "raw events"}], stream=True))
kinds = [e.type for e in events]
assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
assert "content_block_start" in kinds and "content_block_stop" in kinds, kinds

# A tool round trip: tool_use, then tool_result.
tools = [{
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
question = {"role": "user", "content": "What is the weather in Paris?"}
# Greedy: the small model's sampled arguments may wander. This SDK has no
# `temperature` argument any more; the field still exists on the wire.
greedy = {"extra_body": {"temperature": 0}}
first = client.messages.create(
    model=model, max_tokens=100, tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
    system="You are a helpful assistant.", messages=[question], **greedy,
)
assert first.stop_reason == "tool_use", first
call = next(b for b in first.content if b.type == "tool_use")
assert call.name == "get_weather" and call.id.startswith("toolu_"), call
assert isinstance(call.input, dict) and isinstance(call.input.get("city"), str), call.input
second = client.messages.create(
    model=model, max_tokens=30, tools=tools, tool_choice={"type": "none"},
    system="You are a helpful assistant.", **greedy,
    messages=[
        question,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 degrees"}]},
    ],
)
assert second.content and second.content[0].type == "text", second
if on_echo:
    assert second.content[0].text == "sunny, 21 degrees", second

# count_tokens.
count = client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "three words here"}])
assert count.input_tokens > 0, count
if on_echo:
    assert count.input_tokens == 3, count

if on_echo:
    # The SDK's own error classes.
    for call_it, error in [
        (lambda: client.messages.create(model=model, max_tokens=5, messages=[]), anthropic.BadRequestError),
        (lambda: client.messages.create(model="no-such-model", max_tokens=5, messages=[question]), anthropic.NotFoundError),
    ]:
        try:
            call_it()
            raise AssertionError(f"expected {error.__name__}")
        except error as err:
            assert err.body["type"] == "error", err.body
            assert err.request_id, "request-id header"

    # A stream cut after a few events, resumed by re-POSTing with Last-Event-ID.
    body = {"model": model, "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(20))}]}
    with httpx.Client(base_url=base) as http:
        seen, last = "", None
        with http.stream("POST", "/v1/messages", json=body) as cut:
            for line in cut.iter_lines():
                seen += line + "\n"
                if line.startswith("id: ") and line.endswith(".6"):
                    last = line[4:]
                    break
        rest = http.post("/v1/messages", json=body, headers={"Last-Event-ID": last}).text
        whole = http.get(f"/v1/chat/completions/{last.rsplit('.', 1)[0]}/events").text
    assert (seen + "\n" + rest).replace("retry: 1000\n", "") == whole.replace("retry: 1000\n", ""), (seen, rest, whole)
print("anthropic-python: ok")
