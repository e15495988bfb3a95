# The two commands that set up everything on a fresh machine.
.PHONY: serve test lint bench

# Fetch the default models if missing, build, and serve gRPC on :50051, HTTP
# (OpenAI-compatible API, console) on :8080, metrics on :9090.
serve:
	scripts/serve.sh

# Install test dependencies and run the whole test suite.
test:
	scripts/test.sh

# Formatting and lints, as CI checks them.
lint:
	cargo fmt --all -- --check
	cargo clippy --release --locked --all-targets -- -D warnings

# Embedding throughput of tlserve next to sentence-transformers (see docs/BENCHMARKS.md).
bench:
	scripts/bench-embed.sh
