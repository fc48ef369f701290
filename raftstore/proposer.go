package raftstore

import (
	"context"
	"fmt"
	"sync/atomic"
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
// raft.Apply never blocks on a full apply channel; a group that has not
// resolved within groupStall no longer holds back the next.
type proposer struct {
	raft *raft.Raft
	// in is unbuffered: a proposal is either taken by run, which then
	// answers it unless the store closes first, or not taken at all.
	in   chan *proposal
	quit chan struct{}
	// groups counts the groups proposed (for tests).
	groups atomic.Int64
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
// error means no future: ctx ended before the command was taken (ctx's
// error; nothing was proposed), or the store closed (ErrClosed; wrapping
// ErrUnknownOutcome if the command had been taken).
func (p *proposer) apply(ctx context.Context, data []byte) (raft.ApplyFuture, error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(defaultApplyTimeout)
	}
	if time.Until(deadline) <= 0 {
		return nil, deadlineErr(ctx)
	}
	prop := &proposal{data: data, deadline: deadline, done: make(chan raft.ApplyFuture, 1)}
	select {
	case p.in <- prop:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-p.quit:
		return nil, ErrClosed
	}
	// The caller's deadline bounded only the proposing, as raft's own
	// Apply timeout does: once raft has the command, the answer is
	// awaited, since giving up would leave the outcome unknown.
	select {
	case f := <-prop.done:
		return f, nil
	case <-p.quit:
		select {
		case f := <-prop.done:
			return f, nil
		default:
		}
		// Raft v1.7 may never resolve a future it took before it shut
		// down (hashicorp/raft#498): the entry may or may not have
		// committed.
		return nil, fmt.Errorf("%w: %w", ErrClosed, ErrUnknownOutcome)
	}
}

// run proposes groups until stop. Call it in its own goroutine.
func (p *proposer) run() {
	for {
		var group []*proposal
		select {
		case first := <-p.in:
			group = append(make([]*proposal, 0, 8), first)
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
		p.groups.Add(1)
		futures := make([]raft.ApplyFuture, len(group))
		for i, prop := range group {
			// A deadline that passed while queued still gets a moment:
			// the caller is already waiting on the answer.
			futures[i] = p.raft.ApplyLog(commandLog(prop.data), max(time.Until(prop.deadline), time.Millisecond))
		}
		// The futures are awaited on their own goroutine so that a
		// shutdown that leaves one unresolved cannot hold run (and the
		// callers, which watch quit) forever; that goroutine then stays
		// blocked until the process exits.
		answered := make(chan struct{})
		go func() {
			defer close(answered)
			for i, f := range futures {
				_ = f.Error() // waits until applied, refused or lost
				group[i].done <- f
			}
		}()
		stall := time.NewTimer(groupStall)
		select {
		case <-answered:
		case <-stall.C:
			// A group this slow is waiting on something else (a quorum,
			// a stepping-down leader); the next one goes ahead rather
			// than queue behind it, as with raft.Apply per write.
		case <-p.quit:
			stall.Stop()
			return
		}
		stall.Stop()
	}
}

// groupStall is how long a group may hold back the next one. Groups
// normally resolve within a few log commits (milliseconds); one that takes
// longer must not stall every other write of the node.
const groupStall = time.Second

// stop ends run and fails every waiting or later proposal with ErrClosed.
// Call it after raft's shutdown.
func (p *proposer) stop() { close(p.quit) }
