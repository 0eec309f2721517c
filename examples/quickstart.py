from llmos import build, tool

@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers exactly."""
    return a * b

kernel = build(tools=[multiply])  # the default model: SmolLM2-135M-Instruct, on CPU or GPU
for message in kernel.run("What is 12345 times 6789?", tool_choice="multiply"):
    print(message.role, message.content or [(c.name, dict(c.arguments)) for c in message.tool_calls])
