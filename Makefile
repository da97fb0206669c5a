# keyroom: `make dev` brings up a local keyroom; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
STATE_DIR ?= .dev
PY := $(VENV)/bin/python
DEV_DIR = $(abspath $(STATE_DIR))
KUBECTL = $(shell $(PY) -m keyroom.devenv binaries | sed -n 's/^kubectl=//p')

.PHONY: help venv check binaries test unit integration crds docs dev dev-down bench clean mutation images e2e e2e-kind chaos

help:
	@echo "make dev        start a local keyroom (control plane + operator) in $(STATE_DIR)/ and show it working"
	@echo "make dev-down   stop it"
	@echo "make test       unit and integration tests against a real kube-apiserver and etcd"
	@echo "make unit       unit tests only (no cluster)"
	@echo "make crds       regenerate crds/ from operator/keyroom/api"
	@echo "make docs       regenerate the API reference docs/reference/api.md from operator/keyroom/api"
	@echo "make check      say what make dev still needs installed (Go, SoftHSM2, openssl)"
	@echo "make images     build the operator and signer images with podman (root; the Debian base is made locally)"
	@echo "make e2e        the chart's pods on a local node (kubelet, containerd): install, sign, restart, kill (root)"
	@echo "make e2e-kind   the same images, chart and flow on kind (needs Docker and kind)"
	@echo "make bench      measure the signer and SignRequests end to end (figures as ratios to raw python-pkcs11)"
	@echo "make chaos      1,000 SignRequests while the operator and signer are killed 12 times, kube-apiserver and etcd once"
	@echo "make mutation   mutation-test the guards (policy, the signer's requests, keys, audit log, service) with mutmut"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("keyroom needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

binaries: venv
	$(PY) -m keyroom.devenv binaries

test: venv binaries test-tools
	$(PY) -m pytest -ra tests

# The Go tools the tests run (cosign, a registry, crane, policy-controller's tester, Kyverno's CLI, kstatus, helm),
# built from their pinned modules into the cache before pytest starts (a first build takes many minutes).
test-tools: venv
	$(PY) -m tests.tools

unit: venv
	$(PY) -m pytest -ra tests/unit

integration: venv binaries test-tools
	$(PY) -m pytest -ra tests/integration

# The long form of tests/integration/test_chaos.py (make test runs a short one): 1,000 SignRequests approved under
# load while the operator and the signer are killed with SIGKILL 12 times and kube-apiserver and etcd once each;
# every approved request must be signed exactly once. KEYROOM_CHAOS_SEED=N replays a printed fault schedule.
chaos: venv binaries
	KEYROOM_CHAOS_REQUESTS=1000 KEYROOM_CHAOS_FAULTS=12 $(PY) -m pytest tests/integration/test_chaos.py -v -s

images: venv
	$(PY) -m keyroom.devenv.images build

# The end-to-end flow on a local node: needs root (containerd, runc and the kubelet run rootful) and builds the
# node's binaries and the images on a first run. KEYROOM_E2E=1 lets the tests in tests/e2e run.
e2e: venv binaries
	KEYROOM_E2E=1 $(PY) -m pytest -ra -p no:cacheprovider -o log_cli=false -s tests/e2e

# The same images, chart and flow on kind, for machines with Docker and kind (images built by Docker from the
# same Dockerfile, loaded with `kind load`; the cluster keyroom-e2e is deleted afterwards).
e2e-kind: venv
	KEYROOM_E2E=1 KEYROOM_E2E_CLUSTER=kind $(PY) -m pytest -ra -p no:cacheprovider -s tests/e2e/test_flow.py

crds: venv
	$(PY) -m keyroom.api.generate crds

docs: venv
	$(PY) -m keyroom.api.docs

# What `make dev` needs besides Python, each missing one named with how to install it, before anything is built.
check: venv
	@$(PY) -m keyroom.devenv check openssl

dev: venv check binaries
	@if [ -e $(STATE_DIR)/state.json ]; then $(PY) -m keyroom.devenv down --state-dir $(STATE_DIR); fi
	$(PY) -m keyroom.devenv up --state-dir $(STATE_DIR) --detach
	$(KUBECTL) --kubeconfig $(STATE_DIR)/kubeconfig apply -f examples/team-a/
	$(KUBECTL) --kubeconfig $(STATE_DIR)/kubeconfig-alice apply -f examples/requests/
	$(KUBECTL) --kubeconfig $(STATE_DIR)/kubeconfig-alice -n team-a wait --for=condition=Ready signingpolicy/release --timeout=60s
	$(KUBECTL) --kubeconfig $(STATE_DIR)/kubeconfig-alice -n team-a wait --for=condition=Ready signrequest/nightly-2026-11-26 --timeout=60s
	$(KUBECTL) --kubeconfig $(STATE_DIR)/kubeconfig-alice -n team-a wait --for=condition=Ready certificate/team-ca certificate/ci-key-cert certificate/release-key-cert --timeout=60s
	@echo "== alice signs sample artifacts with ci-key in each format (its certificate comes from the team CA)"
	$(PY) -m keyroom.devenv samples --out $(STATE_DIR)/samples
	@set -e; export KUBECONFIG=$(CURDIR)/$(STATE_DIR)/kubeconfig-alice; cd $(STATE_DIR); \
	for format in raw cms sigstore; do \
	  $(CURDIR)/$(VENV)/bin/kubectl-keyroom sign samples/release-notes.txt -n team-a --key ci-key --format $$format --reason "make dev: $$format"; \
	done; \
	$(CURDIR)/$(VENV)/bin/kubectl-keyroom sign samples/app.exe -n team-a --key ci-key --format authenticode --out signed --reason "make dev: authenticode"; \
	$(CURDIR)/$(VENV)/bin/kubectl-keyroom sign samples/app.jar -n team-a --key ci-key --format jar --out signed --reason "make dev: jar"; \
	$(KUBECTL) -n team-a get kcert team-ca -o jsonpath='{.status.certificate}' > samples/team-ca.pem; \
	openssl cms -verify -binary -inform DER -in samples/release-notes.txt.p7s -content samples/release-notes.txt -CAfile samples/team-ca.pem -purpose any -out /dev/null; \
	if command -v osslsigncode >/dev/null; then osslsigncode verify -CAfile samples/team-ca.pem -in signed/app.exe | grep -E '^(Signature verification|Succeeded)'; fi; \
	if command -v jarsigner >/dev/null; then keytool -importcert -noprompt -alias team-ca -file samples/team-ca.pem -keystore samples/trust.p12 -storetype PKCS12 -storepass changeit >/dev/null 2>&1; \
	  jarsigner -verify -strict -keystore samples/trust.p12 -storetype PKCS12 -storepass changeit signed/app.jar | grep -E '^jar verified'; fi
	$(KUBECTL) --kubeconfig $(STATE_DIR)/kubeconfig-alice -n team-a get keyroom
	@echo
	@echo "keyroom runs in $(DEV_DIR)/ (logs in logs/; stop it with: make dev-down). A guided tour, step by step:"
	@echo
	@echo "1. In a shell, as alice (group team-a-devs): the plugin and kubectl on PATH, and a file to sign"
	@echo '     cd $(DEV_DIR) && export PATH=$(abspath $(VENV))/bin:$(patsubst %/,%,$(dir $(KUBECTL))):$$PATH'
	@echo '     export KUBECONFIG=$$PWD/kubeconfig-alice; kubectl keyroom whoami -n team-a'
	@echo '     echo "hello from keyroom" > hello.txt; KEY=release-key'
	@echo "   release-key signs after two approvals, and only in its window (weekdays 09:00-17:00 Europe/Berlin):"
	@echo "   kubectl keyroom keys -n team-a shows whether it is ONLINE and its NEXT WINDOW. Outside the window, take"
	@echo "   the CI key instead: KEY=ci-key, which needs no approval (skip step 3)."
	@echo
	@echo "2. alice hashes the file locally and asks for a signature; sign waits in the background"
	@echo '     kubectl keyroom sign hello.txt --key $$KEY -n team-a --reason "release 1.0" --name hello &'
	@echo
	@echo "3. As bob, then carol (group team-a-approvers): see what waits, check it, approve"
	@echo '     KUBECONFIG=$$PWD/kubeconfig-bob kubectl keyroom pending -n team-a'
	@echo '     KUBECONFIG=$$PWD/kubeconfig-bob kubectl keyroom approve hello -n team-a --reason "notes checked"'
	@echo '     KUBECONFIG=$$PWD/kubeconfig-carol kubectl keyroom approve hello -n team-a --reason "build checked"'
	@echo
	@echo "4. alice's sign returns once the request is Signed, and writes hello.txt.sig"
	@echo '     wait; kubectl keyroom status hello -n team-a'
	@echo
	@echo "5. Verify with public material only, as anyone outside the cluster would: with the plugin, and with openssl"
	@echo '     kubectl keyroom export $$KEY -n team-a --out trust'
	@echo '     kubectl keyroom verify hello.txt --sig hello.txt.sig --trust trust'
	@echo '     openssl dgst -sha256 -verify trust/$$KEY-v1.pub.pem -signature hello.txt.sig hello.txt'
	@echo
	@echo "6. The signer's audit entries for it (admin; the log is checked against its checkpoint first)"
	@echo '     KUBECONFIG=$$PWD/kubeconfig kubectl keyroom audit show --file signer/audit.jsonl -n team-a --request hello'
	@echo
	@echo "More: kubectl keyroom --help; docs/guides/requester.md, docs/guides/approver.md, docs/concepts.md."

dev-down: venv
	$(PY) -m keyroom.devenv down --state-dir $(STATE_DIR)

clean:
	rm -rf $(VENV) build *.egg-info

bench: venv binaries
	$(PY) bench/signer.py
	$(PY) bench/signrequest.py

# Mutation testing (mutmut, configured in pyproject.toml [tool.mutmut]): mutmut names mutants after the file's path,
# which must be the module's, so it runs in $(MUTATION_DIR)/ where keyroom, tests and pyproject.toml are links.
# A fresh run each time; MUTATION_JOBS workers (the machine's cores by default). Survivors are listed at the end;
# `cd $(MUTATION_DIR) && ../$(VENV)/bin/mutmut show NAME` shows one. MUTANTS limits the run to mutants whose names
# match these globs, e.g. make mutation MUTANTS='keyroom.signer.requests.* keyroom.policy.x_decide__*'
MUTATION_DIR ?= .mutation
MUTATION_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
MUTANTS ?=
MUTMUT = $(abspath $(VENV))/bin/mutmut

$(VENV)/.mutation-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,mutation]'
	touch $@

mutation: $(VENV)/.mutation-installed
	rm -rf $(MUTATION_DIR)
	mkdir -p $(MUTATION_DIR)
	ln -s $(CURDIR)/operator/keyroom $(MUTATION_DIR)/keyroom
	ln -s $(CURDIR)/tests $(MUTATION_DIR)/tests
	ln -s $(CURDIR)/pyproject.toml $(MUTATION_DIR)/pyproject.toml
	@echo "mutmut run with $(MUTATION_JOBS) workers; its progress is in $(MUTATION_DIR)/run.log"
	@cd $(MUTATION_DIR) && start=$$(date +%s) && $(MUTMUT) run --max-children $(MUTATION_JOBS) $(foreach m,$(MUTANTS),'$(m)') > run.log 2>&1; \
	  status=$$?; echo "mutmut run took $$(( $$(date +%s) - start ))s (exit status $$status)"; \
	  tr '\r' '\n' < run.log | grep -v -e '^ *$$' -e '[0-9]/[0-9]' -e 'Generating mutants' -e 'Running' | tail -n 5; \
	  exit $$status
	@cd $(MUTATION_DIR) && $(MUTMUT) export-cicd-stats > /dev/null && cat mutants/mutmut-cicd-stats.json
	@echo "mutants by status:"
	@cd $(MUTATION_DIR) && $(MUTMUT) results --all true | sed 's/.*: //' | sort | uniq -c
	@echo "surviving mutants (see one with: cd $(MUTATION_DIR) && $(MUTMUT) show NAME):"
	@cd $(MUTATION_DIR) && $(MUTMUT) results | grep ': survived$$' || echo "  none"
