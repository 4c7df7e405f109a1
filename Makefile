# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Builds live outside the clone so a fresh clone (CI) reuses them.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/access/target
BIN := $(CARGO_TARGET_DIR)/debug/access

.PHONY: help run test services build lint fmt bench-auth bench-entitlements bench-metrics bench-gateway

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

build: ## Build the access binary
	cargo build --locked

run: build ## Run the layer on this machine with embedded backends, and print what to try
	@scripts/run.sh "$(BIN)"

services: ## Install and start what the tests need (tansu; check PostgreSQL and Redis)
	@tests/services.sh

test: services ## Run every test against the real Redis, PostgreSQL and tansu
	source $(CARGO_TARGET_DIR)/test-services.env && cargo test --locked --lib --bins --tests

lint: ## Formatting and clippy, as CI would want them
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings

fmt: ## Format the code
	cargo fmt

bench-auth: ## Verifications per second (RS256, ES256, cold and cached) beside openssl speed
	cargo bench --locked --bench auth

bench-entitlements: services ## Entitlement checks over HTTP with 10,000 rules: checks/s, p50/p99, warm and cold
	cargo bench --locked --bench entitlements

bench-metrics: ## Metrics ingest over HTTP: points/s single and batched, memory per series
	cargo bench --locked --bench metrics

bench-gateway: services ## wrk: upstream, nginx proxy, gateway on a cache miss and a hit (needs nginx, wrk)
	scripts/bench-gateway.sh
