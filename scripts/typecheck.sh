#!/usr/bin/env bash
# mypy over the installed layout. The folders install as kvclip.* through setuptools package-dir,
# which mypy cannot follow (it maps files to modules by directory), so this lays the installed tree
# out as symlinks in .cache/typecheck and reports errors under the repository's own paths.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tree=.cache/typecheck/src
rm -rf "$tree" && mkdir -p "$tree"
cp -rs "$root/kvclip" "$tree/kvclip"
for folder in cache_builder clients deploy service; do
  cp -rs "$root/$folder" "$tree/kvclip/$folder"
done
find "$tree" -name __pycache__ -prune -exec rm -rf {} +
# Checked: the shared core and the client (the server and builder follow once they are clean).
[ $# -gt 0 ] || set -- kvclip/*.py kvclip/clients
status=0
(cd "$tree" && "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" \
   --cache-dir "$root/.cache/typecheck/mypy" "$@") \
  | sed -E "s#^kvclip/(cache_builder|clients|deploy|service)/#\1/#" || status=$?
exit "$status"
