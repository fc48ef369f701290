package raftstore

import (
	"context"
	"time"

	"github.com/hashicorp/raft"
)

// proposer hands this node's proposals to raft one group at a time: every
// command proposed while a group is being committed and applied joins the
// next group, which raft appends to its log in one fsynced commit.
//
// Why not call raft.Apply from each request: raft's leader loop chooses at
// random between two ready events, appending newly proposed entries (a log
// commit, two fdatasyncs) and handing committed entries to the state
// machine. Under a steady stream of writes both are ready after every
// append, so a committed write could wait behind one, two or more further
// appends before it was applied and answered: that was the tail of a
// write's latency at 1,000 writes/s (docs/benchmarks.md). With one group in
// flight, nothing new is queued when a group commits, so it is applied at
// once, and the commits per write do not grow with the rate.
//
// A group is at most maxGroup commands, raft's MaxAppendEntries, so that
// raft.Apply never blocks on a full apply channel.
type proposer struct {
	raft *raft.Raft
	// in is unbuffered: a proposal is either taken by run, which then
	// answers it, or not taken at all.
	in   chan *proposal
	quit chan struct{}
}

type proposal struct {
	data     []byte
	deadline time.Time
	done     chan raft.ApplyFuture // buffered; receives the resolved future
}

const maxGroup = 256

func newProposer(r *raft.Raft) *proposer {
	return &proposer{raft: r, in: make(chan *proposal), quit: make(chan struct{})}
}

// apply proposes data and returns raft's future once it has resolved. An
// error means the command was never proposed: ctx ended first (ctx.Err) or
// the store is closed (ErrClosed).
func (p *proposer) apply(ctx context.Context, data []byte) (raft.ApplyFuture, error) {
	deadline := deadlineOf(ctx)
	if time.Until(deadline) <= 0 {
		return nil, ctx.Err()
	}
	prop := &proposal{data: data, deadline: deadline, done: make(chan raft.ApplyFuture, 1)}
	select {
	case p.in <- prop:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-p.quit:
		return nil, ErrClosed
	}
	// Raft resolves every future it took, on shutdown too, so this wait
	// ends; the caller's deadline bounded only the proposing, as raft's
	// own Apply timeout does.
	return <-prop.done, nil
}

// run proposes groups until stop. Call it in its own goroutine.
func (p *proposer) run() {
	group := make([]*proposal, 0, maxGroup)
	futures := make([]raft.ApplyFuture, 0, maxGroup)
	for {
		select {
		case first := <-p.in:
			group = append(group[:0], first)
		case <-p.quit:
			return
		}
	gather:
		for len(group) < maxGroup {
			select {
			case next := <-p.in:
				group = append(group, next)
			default:
				break gather
			}
		}
		futures = futures[:0]
		for _, prop := range group {
			// A deadline that passed while queued still gets a moment:
			// the caller is already waiting on the answer.
			futures = append(futures, p.raft.Apply(prop.data, max(time.Until(prop.deadline), time.Millisecond)))
		}
		for i, f := range futures {
			_ = f.Error() // waits until applied, refused or lost
			group[i].done <- f
			group[i] = nil
		}
	}
}

// stop ends run once its current group is answered; later proposals get
// ErrClosed. Call it after raft's shutdown, which resolves every future.
func (p *proposer) stop() { close(p.quit) }
