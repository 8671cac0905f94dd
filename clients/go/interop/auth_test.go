package interop

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health/grpc_health_v1"

	"github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchain"
	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// Test 8: the bearer-token server.
func TestAuth(t *testing.T) {
	addr := env["TOOLCHAIN_AUTH_ADDR"]
	t.Run("no token", func(t *testing.T) {
		_, err := dial(t, addr).ListTools(timeout(t, wait))
		wantError(t, err, codes.Unauthenticated, "MISSING_CREDENTIALS")
	})
	t.Run("no token, stream", func(t *testing.T) {
		stream, err := dial(t, addr).StreamSynthesis(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? [calc]"})
		if err != nil {
			t.Fatal(err)
		}
		evs, err := events(t, stream)
		e := wantError(t, err, codes.Unauthenticated, "MISSING_CREDENTIALS")
		t.Logf("%d events, StageError %v", len(evs), e.StageError)
	})
	t.Run("wrong token", func(t *testing.T) {
		_, err := dial(t, addr, toolchain.WithToken("not-"+env["TOOLCHAIN_TOKEN"])).ListTools(timeout(t, wait))
		wantError(t, err, codes.Unauthenticated, "INVALID_CREDENTIALS")
	})
	t.Run("token", func(t *testing.T) {
		client := dial(t, addr, toolchain.WithToken(env["TOOLCHAIN_TOKEN"]))
		resp, err := client.ListTools(timeout(t, wait))
		if err != nil || len(resp.GetTools()) != 3 {
			t.Fatalf("ListTools with the token: %v, %v", resp, err)
		}
		stream, err := client.StreamSynthesis(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? [calc]"})
		if err != nil {
			t.Fatal(err)
		}
		done, err := stream.Wait()
		if err != nil || done.GetText() != answer {
			t.Fatalf("stream with the token: %v, %v", done, err)
		}
	})
	t.Run("health without a token", func(t *testing.T) {
		resp, err := grpc_health_v1.NewHealthClient(dial(t, addr).Conn()).Check(timeout(t, wait), &grpc_health_v1.HealthCheckRequest{})
		if err != nil || resp.GetStatus() != grpc_health_v1.HealthCheckResponse_SERVING {
			t.Fatalf("health: %v, %v; want SERVING", resp, err)
		}
	})
	t.Run("reflection without a token", func(t *testing.T) {
		if services := listServices(t, dial(t, addr)); !contains(services, "toolchain.v1.ToolchainService") {
			t.Fatalf("services %v", services)
		}
	})
}

// Test 9: mutual TLS with the harness's CA and client certificate.
func TestMutualTLS(t *testing.T) {
	addr := env["TOOLCHAIN_TLS_ADDR"]
	mutual := toolchain.TLS{CAFile: env["TOOLCHAIN_TLS_CA"], CertFile: env["TOOLCHAIN_TLS_CLIENT_CERT"], KeyFile: env["TOOLCHAIN_TLS_CLIENT_KEY"]}
	for _, name := range []string{"", "localhost"} {
		cfg := mutual
		cfg.ServerName = name
		resp, err := dial(t, addr, toolchain.WithTLS(cfg)).ListTools(timeout(t, wait))
		if err != nil || len(resp.GetTools()) != 3 {
			t.Fatalf("ListTools over mTLS (server name %q): %v, %v", name, resp, err)
		}
	}
	stream, err := dial(t, addr, toolchain.WithTLS(mutual)).StreamSynthesis(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? [calc]"})
	if err != nil {
		t.Fatal(err)
	}
	if done, err := stream.Wait(); err != nil || done.GetText() != answer {
		t.Fatalf("stream over mTLS: %v, %v", done, err)
	}
	// Without the client certificate the server refuses the connection.
	_, err = dial(t, addr, toolchain.WithTLS(toolchain.TLS{CAFile: env["TOOLCHAIN_TLS_CA"]})).ListTools(timeout(t, wait))
	if err == nil {
		t.Fatal("ListTools over TLS without a client certificate succeeded")
	}
	// Nor does plaintext reach it.
	if _, err := dial(t, addr).ListTools(timeout(t, wait)); err == nil {
		t.Fatal("a plaintext ListTools reached the TLS server")
	}
}
