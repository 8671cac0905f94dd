package toolchain

import (
	"slices"

	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// ToolCall is one tool call assembled from its streamed deltas.
type ToolCall struct {
	Index     int32
	ID        string
	Name      string
	Arguments string // the concatenated JSON argument fragments
}

// ToolCalls assembles the tool-call deltas of a stream's chunks. The zero
// value is ready to use.
type ToolCalls struct {
	calls map[int32]*ToolCall
}

// Add adds the deltas of one chunk.
func (t *ToolCalls) Add(chunk *pb.Chunk) {
	for _, d := range chunk.GetToolCalls() {
		if t.calls == nil {
			t.calls = map[int32]*ToolCall{}
		}
		c := t.calls[d.GetIndex()]
		if c == nil {
			c = &ToolCall{Index: d.GetIndex()}
			t.calls[d.GetIndex()] = c
		}
		if d.GetId() != "" {
			c.ID = d.GetId()
		}
		if d.GetName() != "" {
			c.Name = d.GetName()
		}
		c.Arguments += d.GetArgumentsFragment()
	}
}

// List is the calls so far, by index.
func (t *ToolCalls) List() []ToolCall {
	out := make([]ToolCall, 0, len(t.calls))
	for _, c := range t.calls {
		out = append(out, *c)
	}
	slices.SortFunc(out, func(a, b ToolCall) int { return int(a.Index) - int(b.Index) })
	return out
}
