# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
# The one image name `make image` builds and `make deploy` deploys: the chart's repository and
# appVersion unless given (make image deploy IMAGE=registry.example.com/access:0.1.0).
APP_VERSION := $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/access/Chart.yaml)
IMAGE ?= ghcr.io/254carbon/access:$(APP_VERSION)
.DEFAULT_GOAL := help

# Builds live outside the clone so a fresh clone (CI) reuses them.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/access/target
BIN := $(CARGO_TARGET_DIR)/debug/access

.PHONY: help run test check-deploy check-image check-contracts check-console console-screenshot image push manifests deploy db-backup db-restore services build lint fmt bench-auth bench-entitlements bench-metrics bench-gateway bench-gateway-instructions bench-stream

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

build: ## Build the access binary
	cargo build --locked

run: build ## Run the layer on this machine with embedded backends, and print what to try
	@scripts/run.sh "$(BIN)"

services: ## Install and start what the tests need (tansu; check PostgreSQL and Redis)
	@tests/services.sh

test: services ## Run every test against the real Redis, PostgreSQL and tansu, and check the chart and image offline
	source $(CARGO_TARGET_DIR)/test-services.env && cargo test --locked --lib --bins --tests
	$(MAKE) --no-print-directory check-deploy check-contracts check-console

check-deploy: ## Offline checks of the Helm chart (render, lint, schemas, checkov, the guide's promises), the deploy script on a fake cluster, the Containerfile (hadolint), and the image's pods
	python3 tests/chart/check.py
	python3 tests/deploy/walk.py
	hadolint Containerfile
	$(MAKE) --no-print-directory check-image

check-console: ## The operator's console in headless chromium (Selenium): on `access all`, and on the roles over Redis and PostgreSQL; screenshots in $(CARGO_TARGET_DIR)/console-screenshots/
	python3 tests/console/console_test.py --binary "$(BIN)"

console-screenshot: build ## Refresh docs/console.png (the README's screenshot) from the browser test
	python3 tests/console/console_test.py --binary "$(BIN)" --mode embedded --readme-screenshot docs/console.png

check-image: ## Build the image from the Containerfile (podman) and start every rendered role of dev, staging and production from it, as the kubelet would
	python3 tests/deploy/pods.py --binary "$(BIN)"

manifests: ## Regenerate deploy/k8s/<env>/ (the kubectl method's manifests) from the chart
	for env in dev staging production; do python3 scripts/render-chart.py --env $$env --plain --out deploy/k8s/$$env; done

ENV ?= dev
deploy: ## Deploy $(IMAGE) to the current kubectl context: make deploy ENV=staging [METHOD=kubectl] [NAMESPACE=...] [VALUES=mine.yaml]
	deploy/deploy-k8s.sh -e $(if $(filter prod,$(ENV)),production,$(ENV)) -m $(or $(METHOD),helm) -n $(or $(NAMESPACE),254carbon-access) -i $(IMAGE) $(foreach v,$(VALUES),-V $(v))

BACKUP_DIR ?= backups
db-backup: ## Dump the layer's PostgreSQL data ($$ACCESS_POSTGRES_DSN, or K8S_NAMESPACE=... for the in-cluster one) to $(BACKUP_DIR)/
	deploy/backup/db-backup.sh -o $(BACKUP_DIR) $(if $(K8S_NAMESPACE),-k $(K8S_NAMESPACE))

db-restore: ## Restore a dump: make db-restore FILE=backups/access-....dump (replaces the tables)
	@test -n "$(FILE)" || { echo "make db-restore FILE=<dump>" >&2; exit 2; }
	deploy/backup/db-restore.sh -y $(if $(K8S_NAMESPACE),-k $(K8S_NAMESPACE)) $(FILE)

check-contracts: ## schemathesis against every role's /openapi.json on `access all` (no 5xx, no schema violation)
	tests/contracts/schemathesis.sh "$(BIN)"

image: ## Build the container image with podman or docker (IMAGE=ghcr.io/254carbon/access:<appVersion>)
	@engine=$$(command -v podman || command -v docker) || { echo "make image needs podman or docker" >&2; exit 1; }; \
	$$engine build -f Containerfile -t $(IMAGE) .

push: ## Push $(IMAGE) to its registry (make image push deploy IMAGE=registry.example.com/access:0.1.0)
	@engine=$$(command -v podman || command -v docker) || { echo "make push needs podman or docker" >&2; exit 1; }; \
	$$engine push $(IMAGE)

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

bench-stream: services ## 10,000 WebSocket clients on one stream replica: deliveries/s, produce-to-client p50/p99, RSS per connection
	source $(CARGO_TARGET_DIR)/test-services.env && ulimit -n 20000 && cargo bench --locked --bench stream

bench-gateway: services ## wrk: upstream, nginx proxy, gateway on a cache miss and a hit (needs nginx, wrk)
	scripts/bench-gateway.sh

bench-gateway-instructions: services ## callgrind: the gateway's instructions per request, hit and miss (needs valgrind, nginx)
	scripts/bench-gateway-instructions.sh
