"""openai-python's structured output (`parse`, streaming and not) and
LangChain's ChatOpenAI (`bind_tools`, `with_structured_output`), unmodified.
Env: SLUICEGATE_URL; MODEL (default: the server's first model)."""
import os

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field

base = os.environ["SLUICEGATE_URL"] + "/v1"
client = OpenAI(base_url=base, api_key="not-needed")
model = os.environ.get("MODEL") or client.models.list().data[0].id
system = {"role": "system", "content": "You are a helpful assistant."}


class Capital(BaseModel):
    country: str
    capital: str
    population_millions: int = Field(ge=0, le=100)


question = {"role": "user", "content": "What is the capital of France? Answer in JSON."}
parsed = client.chat.completions.parse(
    model=model, messages=[system, question], response_format=Capital, temperature=0, max_tokens=80
)
message = parsed.choices[0].message
assert parsed.choices[0].finish_reason == "stop", parsed
assert isinstance(message.parsed, Capital), message

with client.chat.completions.stream(
    model=model, messages=[system, question], response_format=Capital, temperature=0, max_tokens=80
) as stream:
    deltas = sum(1 for event in stream if event.type == "content.delta")
    final = stream.get_final_completion()
assert deltas > 1, "the JSON streamed in pieces"
streamed = final.choices[0].message.parsed
assert isinstance(streamed, Capital), final
assert streamed == message.parsed, (streamed, message.parsed)


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny in {city}"


llm = ChatOpenAI(model=model, base_url=base, api_key="not-needed", temperature=0, max_tokens=80)
called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
    [("system", "You are a helpful assistant."), ("user", "What is the weather in Paris?")]
)
assert len(called.tool_calls) == 1, called
assert called.tool_calls[0]["name"] == "get_weather", called.tool_calls
assert isinstance(called.tool_calls[0]["args"].get("city"), str), called.tool_calls

structured = llm.with_structured_output(Capital).invoke(
    [("system", "You are a helpful assistant."), ("user", "What is the capital of France?")]
)
assert isinstance(structured, Capital), structured
print(f"structured: ok {message.parsed.model_dump_json()} {called.tool_calls[0]['args']}")
