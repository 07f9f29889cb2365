package redact

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestSensitiveName(t *testing.T) {
	for _, name := range []string{"Authorization", "proxy-authorization", "Cookie", "X-Api-Key", "X-Auth-Token",
		"client_secret", "PASSWORD", "db-passwd", "X-Consul-Token", "Set-Cookie", "credentials"} {
		if !SensitiveName(name) {
			t.Errorf("SensitiveName(%q) = false, want true", name)
		}
	}
	for _, name := range []string{"Host", "Accept", "User-Agent", "X-Request-Id", "Keep-Alive", "Content-Type"} {
		if SensitiveName(name) {
			t.Errorf("SensitiveName(%q) = true, want false", name)
		}
	}
}

// Every way a Headers value leaves the process is redacted.
func TestHeadersForms(t *testing.T) {
	h := Headers{"Authorization": "Bearer s3cr3t", "X-Api-Key": "k3y", "Host": "app.local", "Cookie": "sid=c00k1e"}
	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("probe", "headers", h, "nested", struct{ H Headers }{h})
	slog.New(slog.NewTextHandler(&logs, nil)).Info("probe", "headers", h, "nested", struct{ H Headers }{h})
	j, err := json.Marshal(struct {
		H Headers `json:"headers"`
	}{h})
	if err != nil {
		t.Fatal(err)
	}
	for name, s := range map[string]string{
		"JSON": string(j), "slog": logs.String(), "%v": fmt.Sprintf("%v", h), "%+v": fmt.Sprintf("%+v", struct{ H Headers }{h}),
		"%#v": fmt.Sprintf("%#v", h), "%s": fmt.Sprintf("%s", h),
	} {
		for _, secret := range []string{"s3cr3t", "k3y", "c00k1e"} {
			if strings.Contains(s, secret) {
				t.Errorf("%s form shows the secret %q: %s", name, secret, s)
			}
		}
		if !strings.Contains(s, "app.local") || !strings.Contains(s, Mask) {
			t.Errorf("%s form %s: want Host shown and the secrets as %s", name, s, Mask)
		}
	}
	if h["Authorization"] != "Bearer s3cr3t" {
		t.Errorf("the map itself lost its value: %v", map[string]string(h))
	}
	if Headers(nil).Redacted() != nil {
		t.Error("nil Headers redacted is not nil")
	}
}

func TestURLRedacted(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"http://collector:4318/v1/traces", "http://collector:4318/v1/traces"},
		{"collector:4317", "collector:4317"},
		{"https://user:pa55@collector:4318/v1", "https://[redacted]@collector:4318/v1"},
		{"https://t0ken@collector", "https://[redacted]@collector"},
		{"user:pa55@collector:4317", Mask},
		{"/health?token=abc&verbose=1", "/health?token=[redacted]&verbose=1"},
		{"/health?verbose=1&Api_Key=x&password=y", "/health?verbose=1&Api_Key=[redacted]&password=[redacted]"},
		{"http://127.0.0.1:8080/ready?x-auth=1", "http://127.0.0.1:8080/ready?x-auth=[redacted]"},
		{"/users/@me", "/users/@me"},
		{"http://a b@c d?%zz", Mask},
	} {
		u := URL(tc.in)
		if got := u.Redacted(); got != tc.want {
			t.Errorf("URL(%q).Redacted() = %q, want %q", tc.in, got, tc.want)
		}
		var logs bytes.Buffer
		slog.New(slog.NewTextHandler(&logs, nil)).Info("x", "url", u)
		j, _ := json.Marshal(u)
		for name, s := range map[string]string{"String": u.String(), "%v": fmt.Sprintf("%v", u), "%#v": fmt.Sprintf("%#v", u), "JSON": string(j), "slog": logs.String()} {
			if tc.in != tc.want && strings.Contains(s, tc.in) {
				t.Errorf("URL(%q): %s form %s is not redacted", tc.in, name, s)
			}
		}
	}
}
