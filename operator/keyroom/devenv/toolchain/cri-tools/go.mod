// Pins the cri-tools release whose crictl talks to the local node's containerd
// through the CRI: listing and stopping pods and containers, reading their logs.
module keyroom.dev/toolchain/cri-tools

go 1.26.6

require sigs.k8s.io/cri-tools v1.37.0
