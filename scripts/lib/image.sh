# shellcheck shell=bash
# Builds the fixture's test image from busybox-static (no Docker): one deterministic layer per
# architecture, OCI configs and manifests, an OCI image index, and a Docker schema2 manifest for
# the host architecture; then pushes them to a registry with curl (OCI distribution API).
# Sourced by scripts/fixture.sh; expects log/die from there. Builds only under the given dir.

# Media types (spec/containerd-client.md §6.5).
MT_OCI_INDEX=application/vnd.oci.image.index.v1+json
MT_OCI_MANIFEST=application/vnd.oci.image.manifest.v1+json
MT_OCI_CONFIG=application/vnd.oci.image.config.v1+json
MT_OCI_LAYER=application/vnd.oci.image.layer.v1.tar+gzip
MT_DOCKER_MANIFEST=application/vnd.docker.distribution.manifest.v2+json
MT_DOCKER_CONFIG=application/vnd.docker.container.image.v1+json
MT_DOCKER_LAYER=application/vnd.docker.image.rootfs.diff.tar.gzip

# Debian architecture of each busybox in the cache -> OCI "architecture" and "variant".
IMAGE_ARCHES=(amd64 arm64 armhf)
oci_arch() { case $1 in amd64) echo amd64 ;; arm64) echo arm64 ;; armhf) echo arm ;; *) return 1 ;; esac; }
oci_variant() { case $1 in armhf) echo v7 ;; *) echo "" ;; esac; }

# add_blob <layout> <file>: moves <file> into <layout>/blobs/sha256 and prints "sha256:<hex> <size>".
add_blob() {
  local layout=$1 file=$2 hex size
  hex=$(sha256sum "$file" | cut -d' ' -f1)
  size=$(stat -c %s "$file")
  mv -f "$file" "$layout/blobs/sha256/$hex"
  echo "sha256:$hex $size"
}

# build_rootfs_tar <busybox> <applets-from> <arch> <out.tar>: the uncompressed layer. Deterministic:
# sorted names, mtime 0, uid/gid 0, fixed modes. Applet links are symlinks; the foreign binary is
# never run (the applet list comes from the host's busybox).
build_rootfs_tar() {
  local busybox=$1 lister=$2 arch=$3 out=$4 root applet
  root=$(dirname "$out")/rootfs-$arch
  rm -rf "$root"
  mkdir -p "$root"/{bin,etc,root,tmp,www}
  install -m 0755 "$busybox" "$root/bin/busybox"
  while read -r applet; do
    case $applet in "" | busybox | */*) continue ;; esac
    ln -sf busybox "$root/bin/$applet"
  done < <("$lister" --list | LC_ALL=C sort -u)
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  printf '%s\n' "$arch" >"$root/etc/oak-fixture-arch"
  printf '<html><body><h1>oak-fixture</h1><p>OAK_FIXTURE_HTTPD_OK</p></body></html>\n' >"$root/www/index.html"
  chmod 0755 "$root" "$root/bin" "$root/etc" "$root/www"
  chmod 0700 "$root/root"
  chmod 1777 "$root/tmp"
  chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/oak-fixture-arch" "$root/www/index.html"
  LC_ALL=C tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu \
    -C "$root" -cf "$out" bin etc root tmp www
  rm -rf "$root"
}

# build_image <dir> <busybox-cache>: writes an OCI image layout at <dir>/image (index.json points at
# the image index, tagged "latest") and <dir>/image/digests (shell lines: FIXTURE_* digests).
build_image() {
  local dir=$1 cache=$2 layout=$1/image work=$1/image/tmp host lister
  host=$(dpkg --print-architecture 2>/dev/null || uname -m)
  case $host in x86_64) host=amd64 ;; aarch64) host=arm64 ;; armv7l) host=armhf ;; esac
  lister=$cache/busybox-$host
  [ -x "$lister" ] || lister=$(command -v busybox) || die "no busybox for the host ($host) in $cache and none on PATH: run scripts/setup-deps.sh"
  mkdir -p "$layout/blobs/sha256" "$work"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  : >"$layout/digests"
  local entries=() arch bb oa ov tarf diff layer lsize config csize manifest msize platform var
  for arch in "${IMAGE_ARCHES[@]}"; do
    bb=$cache/busybox-$arch
    if [ ! -f "$bb" ]; then
      log "warning: $bb missing: image has no $arch variant (run scripts/setup-deps.sh)"
      continue
    fi
    oa=$(oci_arch "$arch")
    ov=$(oci_variant "$arch")
    tarf=$work/layer-$arch.tar
    build_rootfs_tar "$bb" "$lister" "$arch" "$tarf"
    diff=sha256:$(sha256sum "$tarf" | cut -d' ' -f1)
    gzip -n -6 "$tarf"
    read -r layer lsize < <(add_blob "$layout" "$tarf.gz")
    jq -cjn --arg arch "$oa" --arg variant "$ov" --arg diff "$diff" '{
        architecture: $arch, os: "linux", created: "1970-01-01T00:00:00Z",
        config: {Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                 Cmd: ["sh"], WorkingDir: "/"},
        rootfs: {type: "layers", diff_ids: [$diff]},
        history: [{created: "1970-01-01T00:00:00Z", created_by: "oak fixture: busybox-static"}]
      } + (if $variant == "" then {} else {variant: $variant} end)' >"$work/config.json"
    read -r config csize < <(add_blob "$layout" "$work/config.json")
    jq -cjn --arg mt "$MT_OCI_MANIFEST" --arg cmt "$MT_OCI_CONFIG" --arg lmt "$MT_OCI_LAYER" \
      --arg c "$config" --argjson cs "$csize" --arg l "$layer" --argjson ls "$lsize" '{
        schemaVersion: 2, mediaType: $mt,
        config: {mediaType: $cmt, digest: $c, size: $cs},
        layers: [{mediaType: $lmt, digest: $l, size: $ls}]}' >"$work/manifest.json"
    read -r manifest msize < <(add_blob "$layout" "$work/manifest.json")
    platform=$(jq -cn --arg a "$oa" --arg v "$ov" '{architecture: $a, os: "linux"} + (if $v == "" then {} else {variant: $v} end)')
    entries+=("$(jq -cn --arg mt "$MT_OCI_MANIFEST" --arg d "$manifest" --argjson s "$msize" --argjson p "$platform" \
      '{mediaType: $mt, digest: $d, size: $s, platform: $p}')")
    var=$(echo "$oa${ov:+_$ov}" | tr '[:lower:]' '[:upper:]')
    echo "FIXTURE_MANIFEST_$var=$manifest" >>"$layout/digests"
    echo "FIXTURE_LAYER_$var=$layer" >>"$layout/digests"
    if [ "$arch" = "$host" ]; then
      # Docker schema2, same config and layer bytes, Docker media types: pullers must take both.
      jq -cjn --arg mt "$MT_DOCKER_MANIFEST" --arg cmt "$MT_DOCKER_CONFIG" --arg lmt "$MT_DOCKER_LAYER" \
        --arg c "$config" --argjson cs "$csize" --arg l "$layer" --argjson ls "$lsize" '{
          schemaVersion: 2, mediaType: $mt,
          config: {mediaType: $cmt, digest: $c, size: $cs},
          layers: [{mediaType: $lmt, digest: $l, size: $ls}]}' >"$work/docker.json"
      read -r manifest msize < <(add_blob "$layout" "$work/docker.json")
      echo "FIXTURE_DOCKER_MANIFEST_DIGEST=$manifest" >>"$layout/digests"
      echo "FIXTURE_DOCKER_PLATFORM=linux/$oa${ov:+/$ov}" >>"$layout/digests"
    fi
  done
  [ ${#entries[@]} -gt 0 ] || die "no busybox binaries found in $cache: run scripts/setup-deps.sh (or set OAK_BUSYBOX_CACHE)"
  printf '%s\n' "${entries[@]}" | jq -cjs --arg mt "$MT_OCI_INDEX" '{schemaVersion: 2, mediaType: $mt, manifests: .}' \
    >"$work/index.json"
  local index isize
  read -r index isize < <(add_blob "$layout" "$work/index.json")
  echo "FIXTURE_INDEX_DIGEST=$index" >>"$layout/digests"
  echo "FIXTURE_PLATFORMS=$(printf '%s\n' "${entries[@]}" | jq -rs '[.[].platform | "\(.os)/\(.architecture)\(if .variant then "/" + .variant else "" end)"] | join(",")')" \
    >>"$layout/digests"
  jq -cjn --arg mt "$MT_OCI_INDEX" --arg d "$index" --argjson s "$isize" '{schemaVersion: 2,
      manifests: [{mediaType: $mt, digest: $d, size: $s,
                   annotations: {"org.opencontainers.image.ref.name": "latest"}}]}' >"$layout/index.json"
  rm -rf "$work"
}

# push_blob <registry> <repo> <layout> <digest>: monolithic upload (POST then PUT ?digest=).
push_blob() {
  local reg=$1 repo=$2 layout=$3 digest=$4 loc sep
  curl -fsS --max-time 60 -o /dev/null -I "http://$reg/v2/$repo/blobs/$digest" 2>/dev/null && return 0
  loc=$(curl -fsS --max-time 60 -X POST -D - -o /dev/null "http://$reg/v2/$repo/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1) == "location:" {print $2}') ||
    die "registry $reg refused an upload for $repo (POST /v2/$repo/blobs/uploads/): see $FIXTURE_DIR/registry.log"
  [ -n "$loc" ] || die "registry $reg gave no Location for an upload to $repo"
  case $loc in /*) loc=http://$reg$loc ;; esac
  case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
  curl -fsS --max-time 60 -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
    --data-binary "@$layout/blobs/sha256/${digest#sha256:}" "$loc${sep}digest=$digest" ||
    die "registry $reg refused blob $digest for $repo: see $FIXTURE_DIR/registry.log"
}

# push_manifest <registry> <repo> <layout> <digest> <reference> <media type>: checks the digest
# the registry computed against ours.
push_manifest() {
  local reg=$1 repo=$2 layout=$3 digest=$4 ref=$5 mt=$6 got
  got=$(curl -fsS --max-time 60 -X PUT -D - -o /dev/null -H "Content-Type: $mt" \
    --data-binary "@$layout/blobs/sha256/${digest#sha256:}" "http://$reg/v2/$repo/manifests/$ref" |
    tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" {print $2}') ||
    die "registry $reg refused manifest $digest ($mt) as $repo:$ref: see $FIXTURE_DIR/registry.log"
  [ "$got" = "$digest" ] || die "registry $reg stored $repo:$ref as '$got', expected $digest"
}

# push_image <registry> <repo> <layout>: blobs, per-platform manifests by digest, the index as
# "latest", the Docker manifest as "docker"; then reads the index back and compares its digest.
push_image() {
  local reg=$1 repo=$2 layout=$3 index m c l
  index=$(sed -n 's/^FIXTURE_INDEX_DIGEST=//p' "$layout/digests")
  for m in $(jq -r '.manifests[].digest' "$layout/blobs/sha256/${index#sha256:}"); do
    c=$(jq -r '.config.digest' "$layout/blobs/sha256/${m#sha256:}")
    for l in $(jq -r '.layers[].digest' "$layout/blobs/sha256/${m#sha256:}"); do
      push_blob "$reg" "$repo" "$layout" "$l"
    done
    push_blob "$reg" "$repo" "$layout" "$c"
    push_manifest "$reg" "$repo" "$layout" "$m" "$m" "$MT_OCI_MANIFEST"
  done
  push_manifest "$reg" "$repo" "$layout" "$index" latest "$MT_OCI_INDEX"
  m=$(sed -n 's/^FIXTURE_DOCKER_MANIFEST_DIGEST=//p' "$layout/digests")
  [ -z "$m" ] || push_manifest "$reg" "$repo" "$layout" "$m" docker "$MT_DOCKER_MANIFEST"
  local got
  got=$(curl -fsS --max-time 60 -H "Accept: $MT_OCI_INDEX" "http://$reg/v2/$repo/manifests/latest" | sha256sum | cut -d' ' -f1) ||
    die "GET of $repo:latest from $reg failed after the push"
  [ "sha256:$got" = "$index" ] || die "registry $reg serves $repo:latest as sha256:$got, pushed $index"
}

# image_cache_key <busybox-cache>: changes whenever an input of build_image changes (every busybox
# binary, this file), so a cached build is never stale, only unused.
image_cache_key() {
  local cache=$1
  {
    sha256sum "$cache"/busybox-* 2>/dev/null | awk '{print $1, $2}'
    sha256sum "${BASH_SOURCE[0]}" | awk '{print $1}'
    dpkg --print-architecture 2>/dev/null || uname -m
  } | sha256sum | cut -c1-32
}

# verify_layout <layout>: every blob's name is its sha256, and the digests file is there.
verify_layout() {
  local layout=$1 f
  [ -s "$layout/digests" ] && [ -s "$layout/index.json" ] || return 1
  for f in "$layout"/blobs/sha256/*; do
    [ "$(sha256sum "$f" | cut -d' ' -f1)" = "${f##*/}" ] || return 1
  done
}

# prepare_image <dir> <busybox-cache>: <dir>/image, from the build cache
# ($OAK_FIXTURE_CACHE, default /var/cache/oakestra-test/fixture-image; empty disables it) when
# an entry for the same inputs verifies, else built and then added to the cache atomically.
prepare_image() {
  local dir=$1 bb=$2 root=${OAK_FIXTURE_CACHE-/var/cache/oakestra-test/fixture-image} key entry tmp
  if [ -n "$root" ]; then
    key=$(image_cache_key "$bb")
    entry=$root/$key
    if [ -d "$entry" ] && cp -r "$entry" "$dir/image" 2>/dev/null && verify_layout "$dir/image"; then
      return 0
    fi
    rm -rf "$dir/image"
  fi
  build_image "$dir" "$bb"
  [ -n "$root" ] || return 0
  # Best effort: a cache that cannot be written only costs time.
  if mkdir -p "$root" 2>/dev/null && tmp=$(mktemp -d "$root/.tmp-XXXXXX" 2>/dev/null); then
    if cp -r "$dir/image/." "$tmp/" && { rm -rf "$entry" && mv -T "$tmp" "$entry"; } 2>/dev/null; then
      return 0
    fi
    rm -rf "$tmp"
  fi
}
