package toolchain

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// TLS configures a TLS connection. With only CAFile set, the server's
// certificate is verified against that CA; with CertFile and KeyFile set too,
// the client presents its certificate (mutual TLS). An empty CAFile uses the
// system's roots.
type TLS struct {
	// CAFile is a PEM file of the CA certificates that verify the server.
	CAFile string
	// CertFile and KeyFile are the PEM client certificate and its private key,
	// for servers that require mutual TLS. Set both or neither.
	CertFile string
	KeyFile  string
	// ServerName overrides the name the server's certificate is checked
	// against; empty: the host of the target.
	ServerName string
}

// Option configures [NewClient].
type Option func(*options) error

type options struct {
	token string
	tls   *tls.Config
	dial  []grpc.DialOption
}

// WithToken sends `authorization: Bearer <token>` on every call. It is sent
// over plaintext connections too (for servers behind a trusted network or a
// TLS-terminating proxy); combine it with [WithTLS] elsewhere.
func WithToken(token string) Option {
	return func(o *options) error {
		if token == "" {
			return errors.New("toolchain: WithToken: empty token")
		}
		o.token = token
		return nil
	}
}

// WithTLS connects over TLS, or mutual TLS when the client certificate and key
// are given. Without it the connection is plaintext.
func WithTLS(t TLS) Option {
	return func(o *options) error {
		cfg, err := t.config()
		if err != nil {
			return err
		}
		o.tls = cfg
		return nil
	}
}

// WithTLSConfig connects over TLS with a ready tls.Config.
func WithTLSConfig(cfg *tls.Config) Option {
	return func(o *options) error {
		if cfg == nil {
			return errors.New("toolchain: WithTLSConfig: nil config")
		}
		o.tls = cfg.Clone()
		return nil
	}
}

// WithDialOptions adds grpc-go dial options (interceptors, keepalive, ...),
// applied after the ones this package sets.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) error {
		o.dial = append(o.dial, opts...)
		return nil
	}
}

func (t TLS) config() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("toolchain: CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("toolchain: CA file %s: no PEM certificate in it", t.CAFile)
		}
		cfg.RootCAs = pool
	}
	if (t.CertFile == "") != (t.KeyFile == "") {
		return nil, errors.New("toolchain: TLS: set both CertFile and KeyFile, or neither")
	}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("toolchain: client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// bearer is a PerRPCCredentials that sends a static bearer token.
type bearer struct{ token string }

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false so that the token also travels over a
// plaintext connection when the caller asked for both.
func (b bearer) RequireTransportSecurity() bool { return false }

// Client calls a ToolchainService. It is safe for concurrent use; Close it
// when done.
type Client struct {
	conn *grpc.ClientConn
	stub pb.ToolchainServiceClient
}

// NewClient creates a client for target ("host:port", or any grpc-go target
// such as "dns:///host:port" or "unix:///path"). Like grpc.NewClient it does
// not connect until the first call.
func NewClient(target string, opts ...Option) (*Client, error) {
	var o options
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	creds := insecure.NewCredentials()
	if o.tls != nil {
		creds = credentials.NewTLS(o.tls)
	}
	dial := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if o.token != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer{o.token}))
	}
	conn, err := grpc.NewClient(target, append(dial, o.dial...)...)
	if err != nil {
		return nil, fmt.Errorf("toolchain: %w", err)
	}
	return &Client{conn: conn, stub: pb.NewToolchainServiceClient(conn)}, nil
}

// NewClientFromConn wraps an existing connection; Close closes it.
func NewClientFromConn(conn *grpc.ClientConn) *Client {
	return &Client{conn: conn, stub: pb.NewToolchainServiceClient(conn)}
}

// Conn is the underlying connection, for other services on the same server
// (grpc.health.v1, server reflection).
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Stub is the generated client, for calls this wrapper does not cover.
func (c *Client) Stub() pb.ToolchainServiceClient { return c.stub }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// RunTools runs the tool phase of stage. A failed call returns an *Error.
func (c *Client) RunTools(ctx context.Context, stage *pb.StageRequest, opts ...grpc.CallOption) (*pb.RunToolsResponse, error) {
	resp, err := c.stub.RunTools(ctx, &pb.RunToolsRequest{Stage: stage}, opts...)
	return resp, fromCall(err)
}

// RunSynthesis runs both phases of stage. A failed call returns an *Error.
func (c *Client) RunSynthesis(ctx context.Context, stage *pb.StageRequest, opts ...grpc.CallOption) (*pb.RunSynthesisResponse, error) {
	resp, err := c.stub.RunSynthesis(ctx, &pb.RunSynthesisRequest{Stage: stage}, opts...)
	return resp, fromCall(err)
}

// CancelStage cancels the running stage stageID, which may run on any
// connection. An unknown or finished stage fails with NOT_FOUND.
func (c *Client) CancelStage(ctx context.Context, stageID string, opts ...grpc.CallOption) (*pb.CancelStageResponse, error) {
	resp, err := c.stub.CancelStage(ctx, &pb.CancelStageRequest{StageId: stageID}, opts...)
	return resp, fromCall(err)
}

// ListTools lists the server's tools, sorted by name.
func (c *Client) ListTools(ctx context.Context, opts ...grpc.CallOption) (*pb.ListToolsResponse, error) {
	resp, err := c.stub.ListTools(ctx, &pb.ListToolsRequest{}, opts...)
	return resp, fromCall(err)
}

// StreamTools streams the tool phase of stage. Read it with [Stream.Recv],
// [Stream.All] or [Stream.Wait]; cancelling ctx (or [Stream.Close]) cancels
// the call.
func (c *Client) StreamTools(ctx context.Context, stage *pb.StageRequest, opts ...grpc.CallOption) (*Stream, error) {
	callCtx, cancel := context.WithCancel(ctx)
	s, err := c.stub.StreamTools(callCtx, &pb.StreamToolsRequest{Stage: stage}, opts...)
	if err != nil {
		cancel()
		return nil, fromCall(err)
	}
	return newStream(ctx, cancel, false, func() (*pb.StageEvent, error) {
		m, err := s.Recv()
		if err != nil {
			return nil, err
		}
		return m.GetEvent(), nil
	}), nil
}

// StreamSynthesis streams both phases of stage, like [Client.StreamTools].
func (c *Client) StreamSynthesis(ctx context.Context, stage *pb.StageRequest, opts ...grpc.CallOption) (*Stream, error) {
	callCtx, cancel := context.WithCancel(ctx)
	s, err := c.stub.StreamSynthesis(callCtx, &pb.StreamSynthesisRequest{Stage: stage}, opts...)
	if err != nil {
		cancel()
		return nil, fromCall(err)
	}
	return newStream(ctx, cancel, true, func() (*pb.StageEvent, error) {
		m, err := s.Recv()
		if err != nil {
			return nil, err
		}
		return m.GetEvent(), nil
	}), nil
}

// fromCall keeps a nil error nil (a typed nil *Error in an error would not be).
func fromCall(err error) error {
	if err == nil {
		return nil
	}
	return FromError(err)
}
