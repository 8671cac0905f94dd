package interop

import (
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchain"
	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

func contains(list []string, s string) bool { return slices.Contains(list, s) }

// reflect sends one request on a ServerReflectionInfo stream (v1).
func reflect(t *testing.T, c *toolchain.Client, req *grpc_reflection_v1.ServerReflectionRequest) *grpc_reflection_v1.ServerReflectionResponse {
	t.Helper()
	stream, err := grpc_reflection_v1.NewServerReflectionClient(c.Conn()).ServerReflectionInfo(timeout(t, wait))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(req); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("reflection: %v", err)
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if e := resp.GetErrorResponse(); e != nil {
		t.Fatalf("reflection error %d: %s", e.GetErrorCode(), e.GetErrorMessage())
	}
	return resp
}

func listServices(t *testing.T, c *toolchain.Client) []string {
	t.Helper()
	resp := reflect(t, c, &grpc_reflection_v1.ServerReflectionRequest{
		MessageRequest: &grpc_reflection_v1.ServerReflectionRequest_ListServices{ListServices: ""},
	})
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	return names
}

// Test 11: server reflection v1 through grpc-go's client, with the contract's
// comments (source_code_info) in the descriptors.
func TestReflection(t *testing.T) {
	client := plain(t)
	services := listServices(t, client)
	for _, want := range []string{"toolchain.v1.ToolchainService", "grpc.health.v1.Health"} {
		if !contains(services, want) {
			t.Fatalf("ListServices %v lacks %s", services, want)
		}
	}
	resp := reflect(t, client, &grpc_reflection_v1.ServerReflectionRequest{
		MessageRequest: &grpc_reflection_v1.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "toolchain.v1.ToolchainService"},
	})
	var found bool
	for _, raw := range resp.GetFileDescriptorResponse().GetFileDescriptorProto() {
		var fd descriptorpb.FileDescriptorProto
		if err := proto.Unmarshal(raw, &fd); err != nil {
			t.Fatalf("file descriptor: %v", err)
		}
		for i, svc := range fd.GetService() {
			if fd.GetPackage() != "toolchain.v1" || svc.GetName() != "ToolchainService" {
				continue
			}
			found = true
			if fd.GetName() != pb.File_toolchain_v1_toolchain_proto.Path() {
				t.Errorf("file %q, want %q", fd.GetName(), pb.File_toolchain_v1_toolchain_proto.Path())
			}
			comment := leadingComment(&fd, []int32{6, int32(i)}) // 6: FileDescriptorProto.service
			if !strings.Contains(comment, "ToolchainService runs tool stages") {
				t.Fatalf("leading comment of the service %q, want it to mention \"ToolchainService runs tool stages\"", comment)
			}
		}
	}
	if !found {
		t.Fatal("FileContainingSymbol(toolchain.v1.ToolchainService) returned no file declaring it")
	}
}

func leadingComment(fd *descriptorpb.FileDescriptorProto, path []int32) string {
	for _, loc := range fd.GetSourceCodeInfo().GetLocation() {
		if slices.Equal(loc.GetPath(), path) {
			return loc.GetLeadingComments()
		}
	}
	return ""
}

// The older v1alpha protocol, which many tools still speak, answers too.
func TestReflectionV1Alpha(t *testing.T) {
	stream, err := grpc_reflection_v1alpha.NewServerReflectionClient(plain(t).Conn()).ServerReflectionInfo(timeout(t, wait))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&grpc_reflection_v1alpha.ServerReflectionRequest{
		MessageRequest: &grpc_reflection_v1alpha.ServerReflectionRequest_ListServices{},
	}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.CloseSend()
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	if !contains(names, "toolchain.v1.ToolchainService") {
		t.Fatalf("v1alpha ListServices %v", names)
	}
}

// With auth on, reflection answers without a token (as health does): tools such
// as grpcurl ask it before every call, so a token-less health check works.
func TestReflectionNeedsNoTokenWithAuthOn(t *testing.T) {
	client := dial(t, env["TOOLCHAIN_AUTH_ADDR"]) // no WithToken
	if services := listServices(t, client); !contains(services, "toolchain.v1.ToolchainService") {
		t.Fatalf("ListServices on the auth server without a token: %v", services)
	}
}
