#!/usr/bin/env bash
# mutation-check.sh: break the code on purpose, one small change at a time,
# and check that the tests catch every break (issue 14, acceptance 1).
#
#   scripts/mutation-check.sh           unit and in-process tests (minutes)
#   scripts/mutation-check.sh --e2e     also the end-to-end tests that guard
#                                       the breaks (builds the binary per break)
#   ONLY=paging scripts/mutation-check.sh   the breaks whose name holds "paging"
#
# It works on a detached worktree of HEAD (the committed state; your work
# tree is not touched), applies each break with perl, runs the tests that
# should catch it, and prints, per break, CAUGHT with the tests that failed,
# or MISSED. A break whose code is no longer where the script looks prints
# NOT APPLIED: update the script with the code. The exit status is non-zero
# if any break was missed or not applied.
#
# The breaks:
#   auth:<route>      the token check removed from one API route (every route
#                     of api.Server, the catch-all and HandleWithToken's)
#   rpc:<route>       the node-certificate check removed from one cluster RPC
#   paging            after= ignored when listing devices with a condition
#   retention         age-based history retention off
#   ui                the node no longer mounts the dashboard at /ui/
#   trailing-json     data after the JSON body of a request accepted
#   duplicate-keys    a repeated key in a request body accepted
#   replica-writes    the state machine refuses every deployment write (a
#                     write error the replica-agreement test must not swallow)
#   replica-empty     deployments never reach the evaluator (replicas agree
#                     on nothing: the test must see that nothing is assigned)
set -euo pipefail

e2e=false
[ "${1:-}" = "--e2e" ] && e2e=true
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d "${TMPDIR:-/tmp}/mutation-check.XXXXXX")
git -C "$root" worktree add --detach -q "$work" HEAD
cleanup() { git -C "$root" worktree remove --force "$work" >/dev/null 2>&1 || rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
export CGO_ENABLED=1

bad=0
report=()

# mutate NAME FILE PERL PACKAGE TEST-REGEX [E2E-TEST-REGEX]
mutate() {
	local name=$1 file=$2 perl=$3 pkg=$4 tests=$5 e2etests=${6:-}
	if [ -n "${ONLY:-}" ] && [[ $name != *"$ONLY"* ]]; then return; fi
	cp "$file" "$file.orig"
	perl -0pi -e "$perl" "$file"
	if cmp -s "$file" "$file.orig"; then
		mv "$file.orig" "$file"
		report+=("NOT APPLIED  $name: $file no longer has the code this break changes; update scripts/mutation-check.sh")
		bad=1
		return
	fi
	local out caught=() line
	out=$(go test -count=1 -run "$tests" "$pkg" 2>&1 | tr -d '\000') || true
	if grep -q '\[build failed\]\|^# ' <<<"$out"; then
		mv "$file.orig" "$file"
		report+=("BUILD FAILED $name: the break does not compile; fix the script"$'\n'"$(grep -A3 '^# ' <<<"$out" | head -5)")
		bad=1
		return
	fi
	while read -r line; do caught+=("$line"); done < <(grep -o -- '--- FAIL: [A-Za-z0-9_]*' <<<"$out" | awk '{print $3}' | sort -u)
	if $e2e && [ -n "$e2etests" ]; then
		CGO_ENABLED=0 go build -o "$work/bin/appliance" ./cmd/appliance
		out=$(APPLIANCE_BIN="$work/bin/appliance" go test -count=1 -tags e2e -timeout 15m -run "$e2etests" ./e2e/ 2>&1) || true
		while read -r line; do caught+=("e2e:$line"); done < <(grep -o -- '^--- FAIL: [A-Za-z0-9_]*' <<<"$out" | awk '{print $3}' | sort -u)
	fi
	mv "$file.orig" "$file"
	if [ ${#caught[@]} -eq 0 ]; then
		report+=("MISSED       $name (ran $pkg -run '$tests')")
		bad=1
	else
		report+=("CAUGHT       $name by ${caught[*]}")
	fi
	echo "${report[-1]}" >&2
}

# The token check, removed from each API route in turn.
for file in api/*.go; do
	case $file in *_test.go) continue ;; esac
	{ grep -n 's\.auth(' "$file" || true; } | { grep -v 'func (s \*Server) auth' || true; } | while IFS=: read -r n _; do echo "$file:$n"; done
done >"$work/routes.txt"
while IFS=: read -r file n; do
	route=$(sed -n "${n}p" "$file" | { grep -o '"[^"]*"' || true; } | head -1)
	[ -n "$route" ] || route="HandleWithToken"
	mutate "auth:$route" "$file" "my \$i=0; s{^(.*)\$}{ ++\$i == $n ? (\$1 =~ s/s\\.auth\\(/http.HandlerFunc(/r) : \$1 }gme" \
		./node/ 'TestAPI_EveryRouteNeedsTheToken'
done <"$work/routes.txt"

# The node-certificate check, removed from each cluster RPC in turn.
{ grep -n 's\.nodeOnly\(For\)\?(' cluster/rpc.go || true; } | { grep -v ':func ' || true; } | cut -d: -f1 >"$work/rpcs.txt"
while read -r n; do
	route=$(sed -n "${n}p" cluster/rpc.go | { grep -o '"[^"]*"[^,]*' || true; } | head -1)
	[ -n "$route" ] || route="HandleNode"
	mutate "rpc:$route" cluster/rpc.go "my \$i=0; s{^(.*)\$}{ ++\$i == $n ? (\$1 =~ s/s\\.nodeOnly(?:For\\(\\w+, |\\()/(/r) : \$1 }gme" \
		./node/ 'TestCluster_EveryRPCNeedsANodeCertificate'
done <"$work/rpcs.txt"

mutate paging node/backend.go 's#i := sort\.SearchStrings\(ids, q\.After\)#i := sort.SearchStrings(ids, "")#' \
	./node/ 'TestAPI_Paging' 'TestCLI_Table$'
mutate retention node/history.go 's#ok && t\.Before\(cutoff\)#ok && false && t.Before(cutoff)#' \
	./node/ 'TestHistory' 'TestCLI_HistoryFlags'
mutate ui node/node.go 's#srv\.Handle\(ui\.Prefix, ui\.Handler\(\)\)#_ = ui.Handler()#' \
	./node/ 'TestNode_ServesDashboard|TestAPI_EveryRouteNeedsTheToken' 'TestDashboard'
mutate trailing-json api/decode.go 's#if _, err := dec\.Token\(\); err != io\.EOF \{#if _, err := dec.Token(); false && err != io.EOF {#' \
	./api/ 'TestServer_StrictBodies'
mutate duplicate-keys api/decode.go 's#if f\.keys\[key\] \{#if false && f.keys[key] {#' \
	./api/ 'TestServer_StrictBodies'
mutate replica-writes raftstore/fsm.go 's#(func \(w \*writer\) putDeployment\(index uint64, c \*PutDeployment\) \*Result \{\n)#$1\tif true {\n\t\treturn &Result{Index: index, Err: fmt.Errorf("deployment %q: %w", c.Deployment.ID, fleet.ErrExists)}\n\t}\n#' \
	./node/ 'TestCluster_IdenticalAssignments'
mutate replica-empty node/observer.go 's#out, err = n\.engine\.PutDeployment\(engineDeployment\(c\.Deployment\)\)#out, err = nil, nil#' \
	./node/ 'TestCluster_IdenticalAssignments'

echo
printf '%s\n' "${report[@]}"
exit $bad
