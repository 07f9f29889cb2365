package discovery_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// PolicyKV lists and reads the policy keys as the watcher pushes them,
// writes them all or none, and refuses a check-and-set against a changed
// key with the indexes expected and found.
func TestPolicyKV(t *testing.T) {
	agent := consultest.Start(t)
	kv, err := discovery.NewPolicyKV(discovery.PolicyKVConfig{Address: agent.Addr(), Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	indexes, err := kv.Write(ctx, []discovery.PolicyWrite{
		{Key: policy.KVKey("users"), Value: []byte("timeout: 2s\n"), CAS: true, Index: 0},
		{Key: policy.KVKey("*"), Value: []byte("timeout: 9s\n")},
		{Key: policy.KVPrefix + "team/users", Value: []byte("nested: not a policy")},
	})
	if err != nil || len(indexes) != 3 || indexes[0] == 0 {
		t.Fatalf("Write: %v, %v; want three new indexes", indexes, err)
	}
	docs, err := kv.List(ctx)
	if err != nil || len(docs) != 2 || string(docs["users"].Value) != "timeout: 2s\n" || docs["users"].ModifyIndex != indexes[0] ||
		docs["*"].Key != policy.KVKey("*") {
		t.Fatalf("List: %v, %v; want users at index %d and *, not the nested key", docs, err, indexes[0])
	}
	if d, err := kv.Get(ctx, "users"); err != nil || d == nil || d.ModifyIndex != indexes[0] {
		t.Fatalf("Get users: %v, %v; want index %d", d, err, indexes[0])
	}
	if d, err := kv.Get(ctx, "orders"); err != nil || d != nil {
		t.Fatalf("Get orders: %v, %v; want nil, no error", d, err)
	}

	// A stale index fails the whole transaction.
	_, err = kv.Write(ctx, []discovery.PolicyWrite{
		{Key: policy.KVKey("orders"), Value: []byte("timeout: 1s\n"), CAS: true, Index: 0},
		{Key: policy.KVKey("users"), Value: []byte("timeout: 3s\n"), CAS: true, Index: indexes[0] - 1},
	})
	var conflict *discovery.CASConflictError
	if !errors.As(err, &conflict) || conflict.Key != policy.KVKey("users") || conflict.Expected != indexes[0]-1 ||
		conflict.Current != indexes[0] || conflict.Deleting {
		t.Fatalf("Write at a stale index: %v; want a conflict on users, expected %d, current %d", err, indexes[0]-1, indexes[0])
	}
	if d, _ := kv.Get(ctx, "orders"); d != nil {
		t.Fatal("a failed transaction wrote orders: not all-or-nothing")
	}

	if err := kv.Delete(ctx, policy.KVKey("users"), true, indexes[0]-1); !errors.As(err, &conflict) || !conflict.Deleting ||
		conflict.Current != indexes[0] {
		t.Fatalf("Delete at a stale index: %v; want a conflict with current %d", err, indexes[0])
	}
	if err := kv.Delete(ctx, policy.KVKey("users"), true, indexes[0]); err != nil {
		t.Fatalf("Delete at the current index: %v", err)
	}
	if err := kv.Delete(ctx, policy.KVKey("*"), false, 0); err != nil {
		t.Fatalf("Delete without check: %v", err)
	}
	if docs, err := kv.List(ctx); err != nil || len(docs) != 0 {
		t.Fatalf("List after the deletes: %v, %v; want none", docs, err)
	}
}

// A call without an answer is a *KVCallError that says how long it waited.
func TestPolicyKVNoAnswer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0") // accepts (in the kernel), never answers
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	kv, err := discovery.NewPolicyKV(discovery.PolicyKVConfig{Address: ln.Addr().String(), Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	_, err = kv.List(context.Background())
	var call *discovery.KVCallError
	if !errors.As(err, &call) || call.Timeout != 200*time.Millisecond ||
		err.Error() != "listing sidecar/policies/ in Consul KV at "+ln.Addr().String()+": no answer within 200ms" {
		t.Fatalf("List from a silent agent: %v; want no answer within 200ms", err)
	}
}
