"""The official openai Python package's Responses API, unmodified, against
sluicegate on echo: streaming, a resume after a cut, background, cancel,
input items, previous_response_id chains, tools and structured output."""
import os

from openai import OpenAI, NotFoundError, BadRequestError
from pydantic import BaseModel

client = OpenAI(base_url=os.environ["SLUICEGATE_URL"] + "/v1", api_key="not-needed")
words = " ".join(f"w{i}" for i in range(30))

# Streaming: OpenAI's event order, sequence numbers 0, 1, 2, ... with no gap.
events = list(client.responses.create(model="echo", input="python streams words", stream=True))
kinds = [e.type for e in events]
assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"], kinds
assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"], kinds
assert [e.sequence_number for e in events] == list(range(len(events)))
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert text == "python streams words", text
final = events[-1].response
assert final.status == "completed" and final.output_text == "python streams words", final
assert final.usage.output_tokens == 3, final.usage
streamed_id = final.id

# Not streaming: the Response object; retrieve gives it again.
answer = client.responses.create(model="echo", input="plain json", instructions="be brief")
assert answer.output_text == "plain json", answer
assert answer.instructions == "be brief"
assert client.responses.retrieve(answer.id).output_text == "plain json"

# A stream cut after event 5, resumed where it was cut.
stream = client.responses.create(model="echo", input=words, stream=True, background=True)
seen = []
for event in stream:
    seen.append(event)
    if event.sequence_number == 5:
        break
stream.close()
rest = list(client.responses.retrieve(seen[0].response.id, stream=True, starting_after=5))
numbers = [e.sequence_number for e in seen + rest]
assert numbers == list(range(len(numbers))), numbers
text = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
assert text == words, text
assert rest[-1].type == "response.completed", rest[-1]

# Background: returns at once, runs to its end with nobody reading.
bg = client.responses.create(model="echo", input=words, background=True)
assert bg.status in ("queued", "in_progress"), bg.status
cancelled = client.responses.cancel(bg.id)
assert cancelled.status == "cancelled", cancelled.status
assert client.responses.cancel(bg.id).status == "cancelled", "idempotent"
assert len(cancelled.output_text.split()) < 30, cancelled.output_text

# input_items: the response's own input, newest first by default.
chat = client.responses.create(
    model="echo",
    input=[
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "input_text", "text": "second"}]},
    ],
)
assert chat.output_text == "second", chat.output_text
items = client.responses.input_items.list(chat.id)
assert [i.role for i in items.data] == ["user", "assistant", "user"][::-1], items
assert items.data[0].content[0].text == "second"
asc = client.responses.input_items.list(chat.id, order="asc", limit=2)
assert [i.content[0].text for i in asc.data] == ["first", "an answer"] and asc.has_more

# previous_response_id continues the conversation.
follow = client.responses.create(model="echo", input="and then?", previous_response_id=chat.id)
assert follow.output_text == "and then?", follow.output_text
assert follow.previous_response_id == chat.id
try:
    client.responses.create(model="echo", input="x", previous_response_id="resp_unknown")
    raise AssertionError("an unknown previous_response_id is a 400")
except BadRequestError as err:
    assert err.body["param"] == "previous_response_id", err.body

# Function tools over two steps.
tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
step = client.responses.create(model="echo", input="weather in Paris?", tools=tools, tool_choice="required")
calls = [o for o in step.output if o.type == "function_call"]
assert calls and calls[0].name == "get_weather", step.output
second = client.responses.create(
    model="echo",
    previous_response_id=step.id,
    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
    tools=tools,
)
assert second.output_text == "sunny", second.output_text

# Structured output with a Pydantic model, through the stream helper.
class Echoed(BaseModel):
    echo: str

with client.responses.stream(model="echo", input="structured", text_format=Echoed) as s:
    parsed = s.get_final_response().output_parsed
assert parsed == Echoed(echo="structured"), parsed

# Delete: gone afterwards, and another bad id is a 404.
assert client.responses.delete(streamed_id) is None
for gone in (streamed_id, "resp_nothing"):
    try:
        client.responses.retrieve(gone)
        raise AssertionError("deleted")
    except NotFoundError:
        pass
print("openai-python responses: ok")
