package inject

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Decision is what Review decided about one admission request, for logs.
type Decision struct {
	UID       string
	Namespace string
	Name      string // the pod's name, or its generateName followed by "*"
	Operation string
	Injected  bool
	Skipped   string // why not injected
	Denied    string // why the pod was refused (a bad annotation)
	Patch     int    // number of patch operations
	Warnings  []string
}

// Review answers an AdmissionReview v1 (the body the API server posts to a
// mutating webhook). Pod creations get a JSON Patch from InjectPod; every
// other request is allowed unchanged. A pod whose annotations are invalid is
// refused with a message naming the annotation, rather than started without
// the sidecar its owner asked for. An error means the review itself is
// malformed (the HTTP answer is then 400).
func (in *Injector) Review(body []byte) (*admissionv1.AdmissionReview, Decision, error) {
	var review admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &review); err != nil {
		return nil, Decision{}, fmt.Errorf("decoding the AdmissionReview: %w", err)
	}
	if review.APIVersion != "admission.k8s.io/v1" || review.Kind != "AdmissionReview" {
		return nil, Decision{}, fmt.Errorf("got %s %s, want admission.k8s.io/v1 AdmissionReview", review.APIVersion, review.Kind)
	}
	req := review.Request
	if req == nil {
		return nil, Decision{}, errors.New("the AdmissionReview has no request")
	}
	d := Decision{UID: string(req.UID), Namespace: req.Namespace, Name: req.Name, Operation: string(req.Operation)}
	resp := &admissionv1.AdmissionResponse{UID: req.UID, Allowed: true}
	out := &admissionv1.AdmissionReview{TypeMeta: review.TypeMeta, Response: resp}

	pods := metav1.GroupVersionResource{Version: "v1", Resource: "pods"}
	if req.Resource != pods || req.SubResource != "" || req.Operation != admissionv1.Create {
		d.Skipped = fmt.Sprintf("not a pod creation (%s %s)", req.Operation, resourceName(req.Resource, req.SubResource))
		return out, d, nil
	}
	var pod corev1.Pod
	// Not strict: the API server may know fields these types don't, and
	// the patch leaves whatever it doesn't change alone.
	if err := json.Unmarshal(req.Object.Raw, &pod); err != nil {
		return nil, d, fmt.Errorf("decoding the pod: %w", err)
	}
	if d.Name == "" {
		d.Name = pod.Name
	}
	if d.Name == "" && pod.GenerateName != "" {
		d.Name = pod.GenerateName + "*"
	}
	res, err := in.InjectPod(&pod.ObjectMeta, &pod.Spec)
	if err != nil {
		d.Denied = err.Error()
		resp.Allowed = false
		resp.Result = &metav1.Status{
			Status:  metav1.StatusFailure,
			Code:    http.StatusUnprocessableEntity,
			Reason:  metav1.StatusReasonInvalid,
			Message: "sidecar injection: " + err.Error(),
		}
		return out, d, nil
	}
	d.Injected, d.Skipped, d.Warnings = res.Injected, res.Skipped, res.Warnings
	resp.Warnings = res.Warnings
	if !res.Injected {
		return out, d, nil
	}
	patch, err := PatchJSON(res.Patch)
	if err != nil {
		return nil, d, err
	}
	d.Patch = len(res.Patch)
	pt := admissionv1.PatchTypeJSONPatch
	resp.Patch, resp.PatchType = patch, &pt
	return out, d, nil
}

func resourceName(r metav1.GroupVersionResource, sub string) string {
	s := r.Resource
	if r.Group != "" {
		s += "." + r.Group
	}
	if sub != "" {
		s += "/" + sub
	}
	return s
}
