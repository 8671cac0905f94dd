package toolchain

import (
	"cmp"
	"slices"

	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// ToolCall is one tool call assembled from its streamed deltas.
type ToolCall struct {
	Index     int32
	ID        string
	Name      string
	Arguments string // the concatenated JSON argument fragments
	Round     int32  // the tool round of its chunks (0 from a server without rounds)
}

// callKey identifies a call: indexes start at 0 again in every tool round.
type callKey struct{ round, index int32 }

// ToolCalls assembles the tool-call deltas of a stream's chunks, of every
// tool round. The zero value is ready to use.
type ToolCalls struct {
	calls map[callKey]*ToolCall
}

// Add adds the deltas of one chunk.
func (t *ToolCalls) Add(chunk *pb.Chunk) {
	for _, d := range chunk.GetToolCalls() {
		if t.calls == nil {
			t.calls = map[callKey]*ToolCall{}
		}
		k := callKey{chunk.GetRound(), d.GetIndex()}
		c := t.calls[k]
		if c == nil {
			c = &ToolCall{Index: d.GetIndex(), Round: chunk.GetRound()}
			t.calls[k] = c
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

// List is the calls so far, by round, then by index.
func (t *ToolCalls) List() []ToolCall {
	out := make([]ToolCall, 0, len(t.calls))
	for _, c := range t.calls {
		out = append(out, *c)
	}
	slices.SortFunc(out, func(a, b ToolCall) int {
		return cmp.Or(cmp.Compare(a.Round, b.Round), cmp.Compare(a.Index, b.Index))
	})
	return out
}

// Round is the calls of one tool round so far, by index.
func (t *ToolCalls) Round(round int32) []ToolCall {
	return slices.DeleteFunc(t.List(), func(c ToolCall) bool { return c.Round != round })
}
