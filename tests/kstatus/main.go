// kstatus reads Kubernetes objects as JSON (one object, a list, or a stream of objects) on stdin and prints,
// per object, what sigs.k8s.io/cli-utils/pkg/kstatus computes for it: the status kubectl wait, Flux and
// Argo CD's kstatus-based checks rely on. Objects are decoded with apimachinery's JSON, so numbers such as
// generation and observedGeneration stay integers, as they are when the tools read them from the API server.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Kind    string `json:"kind"`
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
	Error   string `json:"error,omitempty"`
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var objects []map[string]interface{}
	if err := utiljson.Unmarshal(data, &objects); err != nil {
		var single map[string]interface{}
		if err := utiljson.Unmarshal(data, &single); err != nil {
			fmt.Fprintln(os.Stderr, "stdin is neither a JSON object nor a JSON array of objects:", err)
			os.Exit(2)
		}
		if items, ok := single["items"].([]interface{}); ok {
			for _, item := range items {
				objects = append(objects, item.(map[string]interface{}))
			}
		} else {
			objects = append(objects, single)
		}
	}
	results := []result{}
	for _, object := range objects {
		u := &unstructured.Unstructured{Object: object}
		r := result{Kind: u.GetKind(), Name: u.GetName()}
		computed, err := status.Compute(u)
		if err != nil {
			r.Error = err.Error()
		} else {
			r.Status, r.Message = computed.Status.String(), computed.Message
		}
		results = append(results, r)
	}
	out, _ := json.Marshal(results)
	fmt.Println(string(out))
}
