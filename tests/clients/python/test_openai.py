"""The official openai Python package, unmodified, against sluicegate."""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["SLUICEGATE_URL"] + "/v1", api_key="not-needed")

# Streaming with include_usage.
stream = client.chat.completions.create(
    model="echo",
    messages=[{"role": "user", "content": "python streams words"}],
    stream=True,
    stream_options={"include_usage": True},
)
text, finish, usage = "", None, None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert text == "python streams words", text
assert finish == "stop", finish
assert usage.completion_tokens == 3, usage

# Not streaming.
answer = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "plain json"}])
assert answer.choices[0].message.content == "plain json", answer
assert answer.usage.total_tokens == 4, answer.usage

# Legacy completions, both ways.
legacy = client.completions.create(model="echo", prompt="legacy prompt here", max_tokens=2)
assert legacy.choices[0].text == "legacy prompt", legacy
assert legacy.choices[0].finish_reason == "length", legacy
pieces = [c.choices[0].text for c in client.completions.create(model="echo", prompt="legacy stream", stream=True) if c.choices]
assert "".join(pieces) == "legacy stream", pieces

# A session's second request cancels the first, which ends cleanly.
first = client.chat.completions.create(
    model="echo",
    messages=[{"role": "user", "content": " ".join(f"w{i}" for i in range(40))}],
    stream=True,
    extra_headers={"X-Session-Id": "py-session"},
)
chunks = iter(first)
next(chunks)
next(chunks)
second = client.chat.completions.create(
    model="echo",
    messages=[{"role": "user", "content": "the next question"}],
    stream=True,
    extra_headers={"X-Session-Id": "py-session"},
)
second_text = "".join(c.choices[0].delta.content or "" for c in second if c.choices)
assert second_text == "the next question", second_text
rest = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert rest == ["cancelled"], rest

print("openai-python: ok")
