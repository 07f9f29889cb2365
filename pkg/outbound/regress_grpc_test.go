package outbound_test

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// notFoundAfterHeaders sends headers first, then fails with NOT_FOUND and
// a trailer of its own.
type notFoundAfterHeaders struct {
	testgrpc.UnimplementedTestServiceServer
}

func (notFoundAfterHeaders) UnaryCall(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	_ = grpc.SendHeader(ctx, metadata.Pairs("x-h", "1"))
	_ = grpc.SetTrailer(ctx, metadata.Pairs("x-t", "1"))
	return nil, status.Error(codes.NotFound, "no such thing")
}

// A status in the trailers reaches the client as the server sent it, even
// when the sidecar read that far to decide about a retry (it once moved
// grpc-status into the headers, and with another trailer left the client
// saw UNKNOWN).
func TestGRPCStatusInTrailersKept(t *testing.T) {
	sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstreamWith(t, notFoundAfterHeaders{})}}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var trailer metadata.MD
	_, err := testgrpc.NewTestServiceClient(grpcClient(t, sc, "echo")).UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.Trailer(&trailer))
	if st := status.Convert(err); st.Code() != codes.NotFound || st.Message() != "no such thing" || len(trailer["x-t"]) != 1 {
		t.Fatalf("through the sidecar: %v, trailer %v; want NOT_FOUND \"no such thing\" and x-t", err, trailer)
	}
}

// headersThenRecv sends its headers (a session id), then waits for the
// client's first message.
type headersThenRecv struct {
	testgrpc.UnimplementedTestServiceServer
}

func (headersThenRecv) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	if err := stream.SendHeader(metadata.Pairs("session", "42")); err != nil {
		return err
	}
	in, err := stream.Recv()
	if err != nil {
		return err
	}
	return stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: in.GetPayload()})
}

// A bidi client that reads the headers before it sends gets them: the
// sidecar passes a stream's headers on at once (it once held them until the
// first body byte, and both sides waited for each other).
func TestGRPCStreamHeadersPassedOnAtOnce(t *testing.T) {
	sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstreamWith(t, headersThenRecv{})}}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := testgrpc.NewTestServiceClient(grpcClient(t, sc, "echo")).FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	md, err := s.Header()
	if err != nil || len(md["session"]) != 1 {
		t.Fatalf("headers: %v %v, want session 42", md, err)
	}
	if err := s.Send(&testgrpc.StreamingOutputCallRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatalf("answer after the headers: %v", err)
	}
}
