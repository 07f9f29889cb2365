package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	sigsjson "sigs.k8s.io/json"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/sidecar-mesh/sidecar/pkg/readlimit"
)

// MaxInput bounds what Documents reads: the cap on every input of the
// sidecar's commands.
const MaxInput = readlimit.Max

// workload describes a kind that has a pod template.
type workload struct {
	apiVersion string
	new        func() any
	// template returns the pod template's metadata and spec, nil when the
	// object has none, and the template's field path.
	template func(obj any) (*metav1.ObjectMeta, *corev1.PodSpec, string)
}

var workloads = map[string]workload{
	"Pod": {"v1", func() any { return &corev1.Pod{} }, func(o any) (*metav1.ObjectMeta, *corev1.PodSpec, string) {
		p := o.(*corev1.Pod)
		return &p.ObjectMeta, &p.Spec, ""
	}},
	"Deployment": {"apps/v1", func() any { return &appsv1.Deployment{} }, func(o any) (*metav1.ObjectMeta, *corev1.PodSpec, string) {
		t := &o.(*appsv1.Deployment).Spec.Template
		return &t.ObjectMeta, &t.Spec, "spec.template."
	}},
	"StatefulSet": {"apps/v1", func() any { return &appsv1.StatefulSet{} }, func(o any) (*metav1.ObjectMeta, *corev1.PodSpec, string) {
		t := &o.(*appsv1.StatefulSet).Spec.Template
		return &t.ObjectMeta, &t.Spec, "spec.template."
	}},
	"DaemonSet": {"apps/v1", func() any { return &appsv1.DaemonSet{} }, func(o any) (*metav1.ObjectMeta, *corev1.PodSpec, string) {
		t := &o.(*appsv1.DaemonSet).Spec.Template
		return &t.ObjectMeta, &t.Spec, "spec.template."
	}},
	"ReplicaSet": {"apps/v1", func() any { return &appsv1.ReplicaSet{} }, func(o any) (*metav1.ObjectMeta, *corev1.PodSpec, string) {
		t := &o.(*appsv1.ReplicaSet).Spec.Template
		return &t.ObjectMeta, &t.Spec, "spec.template."
	}},
	"ReplicationController": {"v1", func() any { return &corev1.ReplicationController{} }, func(o any) (*metav1.ObjectMeta, *corev1.PodSpec, string) {
		t := o.(*corev1.ReplicationController).Spec.Template
		if t == nil {
			return nil, nil, ""
		}
		return &t.ObjectMeta, &t.Spec, "spec.template."
	}},
	"Job": {"batch/v1", func() any { return &batchv1.Job{} }, func(o any) (*metav1.ObjectMeta, *corev1.PodSpec, string) {
		t := &o.(*batchv1.Job).Spec.Template
		return &t.ObjectMeta, &t.Spec, "spec.template."
	}},
	"CronJob": {"batch/v1", func() any { return &batchv1.CronJob{} }, func(o any) (*metav1.ObjectMeta, *corev1.PodSpec, string) {
		t := &o.(*batchv1.CronJob).Spec.JobTemplate.Spec.Template
		return &t.ObjectMeta, &t.Spec, "spec.jobTemplate.spec.template."
	}},
}

// Notice is something Documents tells the user about one object: a
// warning, or why it was not injected.
type Notice struct {
	Where string // e.g. `document 2 (line 14, Deployment web)`
	Text  string
}

func (n Notice) String() string { return n.Where + ": " + n.Text }

// Documents reads a stream of YAML documents (Kubernetes manifests) and
// writes it to w with the sidecar injected into every pod template: Pods,
// Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers,
// Jobs and CronJobs, also inside a List. Other documents, and objects that
// are not injected (opted out, already injected), are written exactly as
// read; injected ones keep their key order and comments, so that running
// it twice gives the same bytes as running it once. Nothing is written when
// a document is malformed: the error names the document (its index and
// line, its kind and name) and the field.
func (in *Injector) Documents(r io.Reader, w io.Writer) ([]Notice, error) {
	data, err := readlimit.ReadAll(r, "input")
	if err != nil {
		return nil, err
	}
	return in.DocumentBytes(data, w)
}

// DocumentBytes is Documents of an input already read: data, which it
// does not change or keep.
func (in *Injector) DocumentBytes(data []byte, w io.Writer) ([]Notice, error) {
	var (
		out     bytes.Buffer
		notices []Notice
		n       int
	)
	for _, d := range splitDocuments(data) {
		if isBlank(d.text) {
			continue
		}
		n++
		// The separator line as written (with its comment, if any).
		if d.sep != nil {
			out.Write(d.sep)
		}
		where := fmt.Sprintf("document %d (line %d", n, d.line)
		text, ns, err := in.document(d.text, where)
		notices = append(notices, ns...)
		if err != nil {
			return notices, err
		}
		out.Write(text)
		if len(text) > 0 && text[len(text)-1] != '\n' {
			out.WriteByte('\n')
		}
	}
	_, err := w.Write(out.Bytes())
	return notices, err
}

// document injects one YAML document; where is "document N (line L", which
// document closes after adding the kind and name.
func (in *Injector) document(text []byte, where string) ([]byte, []Notice, error) {
	if isCommentsOnly(text) {
		return text, nil, nil
	}
	js, err := sigsyaml.YAMLToJSONStrict(text)
	if err != nil {
		return nil, nil, fmt.Errorf("%s): %w", where, err)
	}
	var tm typeMeta
	if err := json.Unmarshal(js, &tm); err == nil && tm.APIVersion != "" && tm.isList() {
		return in.list(text, js, tm.Items, where)
	}
	ops, notices, err := in.object(js, "", where, "")
	if err != nil || len(ops) == 0 {
		return text, notices, err
	}
	doc, root, err := parseDocument(text, js)
	if err != nil {
		return nil, notices, fmt.Errorf("%s): %w", where, err)
	}
	if err := Apply(root, ops); err != nil {
		return nil, notices, fmt.Errorf("%s): applying the injection: %w", where, err)
	}
	out, err := encodeYAML(doc)
	if err != nil {
		return nil, notices, fmt.Errorf("%s): encoding: %w", where, err)
	}
	return out, notices, nil
}

// list injects a document that is a List (what kubectl get -o yaml
// writes), one item at a time: each item is decoded, injected and written
// out before the next, so that what is held is the document's tree and the
// output, never every item's injected tree at once (the YAML encoder keeps
// every event of a document until its end: a 10,000-item List took 3 GB
// encoded whole).
func (in *Injector) list(text, js []byte, items []json.RawMessage, where string) ([]byte, []Notice, error) {
	doc, root, err := parseDocument(text, js)
	if err != nil {
		return nil, nil, fmt.Errorf("%s): %w", where, err)
	}
	seq, _ := child(root, "items")
	if seq == nil || seq.Kind != yaml.SequenceNode || len(seq.Content) != len(items) {
		return nil, nil, fmt.Errorf("%s): items: not a sequence of %d objects", where, len(items))
	}
	// A List in flow style (JSON, as kubectl get -o json writes) is
	// written in block style, as patching it whole would (a block value
	// added inside flow collections turns them to block style), so that
	// its items can be written one by one too.
	root.Style &^= yaml.FlowStyle
	seq.Style &^= yaml.FlowStyle
	// The document with a placeholder for its items, written around the
	// items written one by one; when the items don't sit at the left
	// margin, the document is written whole at the end.
	nodes := seq.Content
	seq.Content = []*yaml.Node{{Kind: yaml.ScalarNode, Tag: "!!str", Value: itemsPlaceholder}}
	frame, err := encodeYAML(doc)
	seq.Content = nodes
	if err != nil {
		return nil, nil, fmt.Errorf("%s): encoding: %w", where, err)
	}
	head, tail, stream := bytes.Cut(frame, []byte("\n- "+itemsPlaceholder+"\n"))
	stream = stream && !bytes.Contains(text, []byte(itemsPlaceholder))
	var (
		out     bytes.Buffer
		notices []Notice
		changed bool
	)
	if stream {
		out.Write(head)
		out.WriteByte('\n')
	}
	for i, item := range items {
		ops, ns, err := in.object(item, "", where, fmt.Sprintf("items[%d].", i))
		notices = append(notices, ns...)
		if err != nil {
			return nil, notices, err
		}
		if len(ops) > 0 {
			changed = true
			if err := Apply(nodes[i], ops); err != nil {
				return nil, notices, fmt.Errorf("%s): items[%d]: applying the injection: %w", where, i, err)
			}
		}
		if stream {
			one := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Content: nodes[i : i+1]}
			b, err := encodeYAML(one)
			if err != nil {
				return nil, notices, fmt.Errorf("%s): items[%d]: encoding: %w", where, i, err)
			}
			out.Write(b)
			nodes[i], items[i] = nil, nil // written: let them go
		}
	}
	switch {
	case !changed:
		return text, notices, nil
	case stream:
		out.Write(tail)
		return out.Bytes(), notices, nil
	}
	b, err := encodeYAML(doc)
	if err != nil {
		return nil, notices, fmt.Errorf("%s): encoding: %w", where, err)
	}
	return b, notices, nil
}

// itemsPlaceholder stands for a List's items while the rest of the
// document is written.
const itemsPlaceholder = "sidecar-inject-items-placeholder-5f0c2d"

// parseDocument parses a document's YAML (text) for patching, or, when it
// has anchors, aliases or merge keys (which patching by path can't keep),
// its plain form (js; comments are lost). root is the document's content.
func parseDocument(text, js []byte) (doc, root *yaml.Node, err error) {
	doc = &yaml.Node{}
	if err := yaml.Unmarshal(text, doc); err != nil {
		return nil, nil, err
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return nil, nil, errors.New("not a single YAML document")
	}
	if hasAliases(doc.Content[0]) {
		if doc.Content[0], err = jsonNode(js); err != nil {
			return nil, nil, err
		}
	}
	return doc, doc.Content[0], nil
}

// encodeYAML writes a node as the injector writes every document: two
// spaces of indentation, sequences not indented under their key.
func encodeYAML(n *yaml.Node) ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	enc.CompactSeqIndent()
	if err := enc.Encode(n); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// typeMeta is what identifies an object, plus a List's items.
type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name         string `json:"name"`
		GenerateName string `json:"generateName"`
	} `json:"metadata"`
	Items []json.RawMessage `json:"items"`
}

// isList says whether the object is a List of objects (v1 List, or a
// FooList with items), whose items are injected one by one.
func (tm *typeMeta) isList() bool {
	return tm.APIVersion == "v1" && tm.Kind == "List" || strings.HasSuffix(tm.Kind, "List") && tm.Items != nil
}

// object returns the patch that injects one object (recursing into a
// List's items); path is the object's JSON Pointer in the document, field
// its field path prefix.
func (in *Injector) object(js []byte, path, where, field string) ([]Operation, []Notice, error) {
	var tm typeMeta
	if err := json.Unmarshal(js, &tm); err != nil {
		return nil, nil, fmt.Errorf("%s): %snot a Kubernetes object: %w", where, field, err)
	}
	name := tm.Metadata.Name
	if name == "" && tm.Metadata.GenerateName != "" {
		name = tm.Metadata.GenerateName + "*"
	}
	label := where + ", " + tm.Kind
	if name != "" {
		label += " " + name
	}
	label += ")"
	switch {
	case tm.Kind == "":
		return nil, nil, fmt.Errorf("%s): %skind: missing: not a Kubernetes object", where, field)
	case tm.APIVersion == "":
		return nil, nil, fmt.Errorf("%s: %sapiVersion: missing", label, field)
	}
	if tm.isList() {
		var ops []Operation
		var notices []Notice
		for i, item := range tm.Items {
			o, ns, err := in.object(item, path+"/items/"+strconv.Itoa(i), where, fmt.Sprintf("%sitems[%d].", field, i))
			notices = append(notices, ns...)
			if err != nil {
				return nil, notices, err
			}
			ops = append(ops, o...)
		}
		return ops, notices, nil
	}
	wl, ok := workloads[tm.Kind]
	if !ok {
		return nil, nil, nil // not ours: untouched
	}
	if tm.APIVersion != wl.apiVersion {
		return nil, nil, fmt.Errorf("%s: %sapiVersion: %s %s is not supported (want %s)", label, field, tm.APIVersion, tm.Kind, wl.apiVersion)
	}
	obj := wl.new()
	strict, err := sigsjson.UnmarshalStrict(js, obj)
	if err != nil {
		at := ""
		if field != "" {
			at = strings.TrimSuffix(field, ".") + ": "
		}
		return nil, nil, fmt.Errorf("%s: %s%s", label, at, strings.TrimPrefix(err.Error(), "json: "))
	}
	var msgs []string
	for _, e := range strict {
		// A field of status this build does not know (kubectl get -o yaml
		// of a newer cluster, say status.observedGeneration of a Pod) is
		// no typo of the user's, and status is never patched.
		if !strings.Contains(e.Error(), `unknown field "status.`) {
			msgs = append(msgs, field+e.Error())
		}
	}
	if len(msgs) > 0 {
		return nil, nil, fmt.Errorf("%s: %s", label, strings.Join(msgs, "; "))
	}
	meta, spec, tpath := wl.template(obj)
	if spec == nil {
		return nil, nil, nil
	}
	res, err := in.InjectPod(meta, spec)
	if err != nil {
		var list ErrorList
		if errors.As(err, &list) {
			err = list.Prefixed(field + tpath)
		}
		return nil, nil, fmt.Errorf("%s: %w", label, err)
	}
	var notices []Notice
	for _, wr := range res.Warnings {
		notices = append(notices, Notice{Where: label, Text: "warning: " + wr})
	}
	if !res.Injected {
		notices = append(notices, Notice{Where: label, Text: "not injected: " + res.Skipped})
		return nil, notices, nil
	}
	prefix := path + "/" + strings.ReplaceAll(strings.TrimSuffix(tpath, "."), ".", "/")
	if tpath == "" {
		prefix = path
	}
	ops := res.Patch
	for i := range ops {
		ops[i].Path = prefix + ops[i].Path
	}
	return ops, notices, nil
}

// rawDocument is one document of a YAML stream, the line it starts on, and
// the separator line before it (nil for the first).
type rawDocument struct {
	text []byte
	line int
	sep  []byte
}

// splitDocuments cuts a YAML stream at "---" lines, as kubectl does.
func splitDocuments(data []byte) []rawDocument {
	var docs []rawDocument
	var sep []byte
	start, startLine, line := 0, 1, 1
	for i := 0; i <= len(data); {
		end := bytes.IndexByte(data[i:], '\n')
		next := len(data) + 1
		if end >= 0 {
			next = i + end + 1
		} else {
			end = len(data) - i
		}
		l := bytes.TrimRight(data[i:i+end], " \t\r")
		if bytes.Equal(l, []byte("---")) || bytes.HasPrefix(l, []byte("--- ")) {
			docs = append(docs, rawDocument{text: data[start:i], line: startLine, sep: sep})
			sep = append(bytes.Clone(data[i:i+end]), '\n')
			start, startLine = min(next, len(data)), line+1
		}
		i = next
		line++
	}
	return append(docs, rawDocument{text: data[start:], line: startLine, sep: sep})
}

func isBlank(b []byte) bool { return len(bytes.TrimSpace(b)) == 0 }

// isCommentsOnly says whether a document holds nothing but comments.
func isCommentsOnly(b []byte) bool {
	for _, l := range bytes.Split(b, []byte("\n")) {
		l = bytes.TrimSpace(l)
		if len(l) > 0 && l[0] != '#' {
			return false
		}
	}
	return true
}

func hasAliases(n *yaml.Node) bool {
	if n.Kind == yaml.AliasNode || n.Anchor != "" {
		return true
	}
	if n.Kind == yaml.MappingNode {
		for i := 0; i < len(n.Content); i += 2 {
			if n.Content[i].Value == "<<" && n.Content[i].Tag == "!!merge" {
				return true
			}
		}
	}
	for _, c := range n.Content {
		if hasAliases(c) {
			return true
		}
	}
	return false
}
