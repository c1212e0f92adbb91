"""openai-python's responses.stream helper with a Pydantic text_format on
the real model: the answer is JSON of that schema, parsed by the SDK."""
import os

from openai import OpenAI
from pydantic import BaseModel

client = OpenAI(base_url=os.environ["SLUICEGATE_URL"] + "/v1", api_key="not-needed")


class Capital(BaseModel):
    country: str
    capital: str


with client.responses.stream(
    model=os.environ["MODEL"],
    instructions="You are a helpful assistant.",
    input="What is the capital of France?",
    text_format=Capital,
    temperature=0,
    max_output_tokens=60,
) as stream:
    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    final = stream.get_final_response()
assert final.status == "completed", final
assert isinstance(final.output_parsed, Capital), final.output_parsed
assert "".join(deltas) == final.output_text
print(f"responses on the model: ok {final.output_parsed!r}")
