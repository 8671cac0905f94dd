package interop

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchain"
	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// The harness's environment (see doc.go).
var env = map[string]string{
	"TOOLCHAIN_ADDR":            "",
	"TOOLCHAIN_AUTH_ADDR":       "",
	"TOOLCHAIN_TOKEN":           "",
	"TOOLCHAIN_TLS_ADDR":        "",
	"TOOLCHAIN_TLS_CA":          "",
	"TOOLCHAIN_TLS_CLIENT_CERT": "",
	"TOOLCHAIN_TLS_CLIENT_KEY":  "",
	"TOOLCHAIN_FAKE_URL":        "",
}

func TestMain(m *testing.M) {
	var missing []string
	for name := range env {
		env[name] = os.Getenv(name)
		if env[name] == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		fmt.Fprintf(os.Stderr, "FAIL: the interop tests need %s: run them through python -m tests.interop.serve, e.g.\n"+
			"  cd <repo> && .venv/bin/python -m tests.interop.serve -- bash -c 'cd clients/go && go test -count=1 ./...'\n",
			strings.Join(missing, ", "))
		os.Exit(1)
	}
	os.Exit(m.Run())
}

const (
	answer   = "The answer is 42."
	textOnly = "Hello from the fake model."
	// wait bounds every wait on the servers: generous, for a slow shared CI box.
	wait = 30 * time.Second
)

// dial is a client of addr, closed when the test ends.
func dial(t *testing.T, addr string, opts ...toolchain.Option) *toolchain.Client {
	t.Helper()
	c, err := toolchain.NewClient(addr, opts...)
	if err != nil {
		t.Fatalf("NewClient(%s): %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func plain(t *testing.T) *toolchain.Client { return dial(t, env["TOOLCHAIN_ADDR"]) }

// timeout is a context that ends after d or with the test.
func timeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// unique is a tag or stage id no other test (or run) uses.
func unique(t *testing.T, prefix string) string {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return prefix + "-" + hex.EncodeToString(b)
}

// wantError asserts that err is a *toolchain.Error with code and reason. Every
// reason a test receives goes through here, so each is checked against the
// ErrorReason enum (and its domain against toolchain.v1).
func wantError(t *testing.T, err error, code codes.Code, reason string) *toolchain.Error {
	t.Helper()
	var e *toolchain.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T), want a *toolchain.Error %s %s", err, err, toolchain.CodeName(code), reason)
	}
	if e.Code != code || e.Reason != reason {
		t.Fatalf("error %v, want %s %s", e, toolchain.CodeName(code), reason)
	}
	checkReason(t, e)
	return e
}

func checkReason(t *testing.T, e *toolchain.Error) {
	t.Helper()
	if e.Reason == "" {
		return
	}
	r, known := e.ErrorReason()
	if !known || r.String() != e.Reason {
		t.Fatalf("reason %q is not a value name of toolchain.v1.ErrorReason", e.Reason)
	}
	if e.Domain != toolchain.Domain {
		t.Fatalf("ErrorInfo.domain %q, want %q", e.Domain, toolchain.Domain)
	}
	if _, ok := pb.Phase_value[e.Metadata["phase"]]; !ok {
		t.Fatalf("ErrorInfo metadata phase %q is not a Phase name", e.Metadata["phase"])
	}
}

// events reads a stream to its end: every event, and the error it ended with
// (nil for a finished stage).
func events(t *testing.T, s *toolchain.Stream) ([]*pb.StageEvent, error) {
	t.Helper()
	var out []*pb.StageEvent
	for {
		ev, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			var p *toolchain.ProtocolError
			if errors.As(err, &p) {
				t.Fatalf("the stream broke the contract: %v", p)
			}
			return out, err
		}
		out = append(out, ev)
	}
}

// firstChunk waits for the first event of a [hang] stream: its "thinking" chunk.
func firstChunk(t *testing.T, s *toolchain.Stream) *pb.StageEvent {
	t.Helper()
	ev, err := s.Recv()
	if err != nil {
		t.Fatalf("waiting for the first chunk: %v", err)
	}
	if ev.GetChunk().GetPhase() != pb.Phase_PHASE_TOOL || ev.GetChunk().GetContent() != "thinking" {
		t.Fatalf("first event %v, want the tool phase chunk \"thinking\"", ev)
	}
	return ev
}

// closed asks the fake backend whether the [hang tag=tag] request was closed,
// waiting up to 10 s for it.
func closed(t *testing.T, tag string) bool {
	t.Helper()
	u := fmt.Sprintf("%s/interop/closed?tag=%s&timeout=10", env["TOOLCHAIN_FAKE_URL"], url.QueryEscape(tag))
	req, err := http.NewRequestWithContext(timeout(t, wait), http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("control endpoint: %v", err)
	}
	defer resp.Body.Close()
	var body struct {
		Closed bool `json:"closed"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatalf("control endpoint answer: %v", err)
	}
	return body.Closed
}

func hang(tag string) string { return fmt.Sprintf("Think about it. [hang tag=%s]", tag) }
