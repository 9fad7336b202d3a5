#!/usr/bin/env bash
# Re-fetch the vendored map libraries from the npm registry (npm pack: the registry's own
# tarball, whose integrity npm checks) and check each file against VERSIONS' sha256.
#   fetch.sh          fetch into a temporary directory and compare with the files here
#   fetch.sh --update fetch and overwrite the files here (then update VERSIONS by hand: review)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
# package@version  file-in-package  vendored-name
while read -r pkg src dst; do
  [ -z "$pkg" ] && continue
  tgz="$(npm pack --silent "$pkg")"
  mkdir -p "x/$pkg" && tar xzf "$tgz" -C "x/$pkg"
  cp "x/$pkg/package/$src" "$tmp/$dst"
done <<'LIST'
cytoscape@3.34.4 dist/cytoscape.min.js cytoscape.min.js
cytoscape@3.34.4 LICENSE cytoscape.LICENSE
cytoscape-dagre@4.0.1 dist/cytoscape-dagre.min.js cytoscape-dagre.min.js
cytoscape-dagre@4.0.1 LICENSE cytoscape-dagre.LICENSE
@dagrejs/dagre@3.0.0 LICENSE dagrejs-dagre.LICENSE
LIST
status=0
while read -r sha name; do
  case "$sha" in ''|'#'*) continue ;; esac
  got="$(sha256sum "$tmp/$name" | cut -d' ' -f1)"
  if [ "$got" != "$sha" ]; then echo "MISMATCH $name: VERSIONS says $sha, the registry's is $got"; status=1; fi
  if [ "${1:-}" = "--update" ]; then cp "$tmp/$name" "$here/$name"
  elif ! cmp -s "$tmp/$name" "$here/$name"; then echo "DIFFERS $name from the registry's"; status=1; fi
done < <(grep -v '^#' "$here/VERSIONS" | awk 'NF==2')
[ $status = 0 ] && echo "vendored map libraries match the npm registry"
exit $status
