"""The OpenAI Agents SDK (openai-agents), unmodified, against sluicegate on
echo through the Responses API: Runner.run_streamed with a function tool
over two model turns, tracing export off."""
import asyncio
import os

from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

set_tracing_disabled(True)
client = AsyncOpenAI(base_url=os.environ["SLUICEGATE_URL"] + "/v1", api_key="not-needed")
calls = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    calls.append(city)
    return f"sunny in {city}"


agent = Agent(
    name="weather",
    instructions="Answer with the tool's result.",
    model=OpenAIResponsesModel(model="echo", openai_client=client),
    tools=[get_weather],
)


async def main():
    result = Runner.run_streamed(agent, input="What is the weather? call get_weather")
    deltas = []
    async for event in result.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            deltas.append(event.data.delta)
    assert calls == ["What is the weather? call get_weather"], calls
    # Echo answers the tool's result on the second turn.
    assert result.final_output == "sunny in What is the weather? call get_weather", result.final_output
    assert "".join(deltas) == result.final_output, deltas
    print("openai-agents: ok")


asyncio.run(main())
