#!/usr/bin/env python3
"""Embeds texts through tlserve's OpenAI-compatible API with the official `openai` package.

Usage:
    python tests/clients/openai_embed.py --base-url http://localhost:8080/v1 \\
        --model all-MiniLM-L6-v2 "A cat sits on the mat." "Dogs bark."

The backbone's name is the model. Prints {"model", "usage", "embeddings": [[...], ...]}
as JSON. The API key is read from TLSERVE_TOKEN (any text when the server has
authentication off). `--encoding-format float` asks for JSON numbers; by default the
SDK asks for base64 and decodes it itself. `--token-ids` sends each argument as
comma-separated ids of the backbone's own tokenizer instead of a text.
"""

import argparse
import json
import os
import sys

import openai


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8080/v1")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--encoding-format", choices=["float", "base64"])
    parser.add_argument("--dimensions", type=int)
    parser.add_argument("--token-ids", action="store_true")
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args()

    client = openai.OpenAI(
        base_url=args.base_url,
        api_key=os.environ.get("TLSERVE_TOKEN", "unused"),
        max_retries=0,
    )
    inputs = (
        [[int(i) for i in item.split(",")] for item in args.inputs]
        if args.token_ids
        else args.inputs
    )
    options = {}
    if args.encoding_format:
        options["encoding_format"] = args.encoding_format
    if args.dimensions:
        options["dimensions"] = args.dimensions
    try:
        response = client.embeddings.create(model=args.model, input=inputs, **options)
    except openai.APIStatusError as err:
        # The SDK raises a subclass per HTTP status (NotFoundError, BadRequestError...).
        print(json.dumps({"error": type(err).__name__, "status": err.status_code,
                          "body": err.body}))
        return 2
    print(json.dumps({
        "model": response.model,
        "usage": {"prompt_tokens": response.usage.prompt_tokens,
                  "total_tokens": response.usage.total_tokens},
        "embeddings": [item.embedding for item in response.data],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
