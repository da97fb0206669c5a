// Pins the containerd release that runs the local node's containers (the CRI
// runtime of the kubelet): containerd, containerd-shim-runc-v2 and ctr are built
// from it. runc comes from the system.
module keyroom.dev/toolchain/containerd

go 1.26.0

require github.com/containerd/containerd/v2 v2.2.9
