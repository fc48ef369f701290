package northbound

import (
	"context"
	"errors"
)

// TailFilter selects messages by device and module ("" : any).
type TailFilter struct {
	Device, Module string
}

func (f TailFilter) matches(device, module string) bool {
	return (f.Device == "" || f.Device == device) && (f.Module == "" || f.Module == module)
}

// Tail calls fn with each message this node receives from now on that f
// selects, in order, until ctx ends (nil is returned) or fn fails (its
// error is returned). It reads the retention log like a consumer, so it
// never holds up devices; a tail slower than the retention loses what was
// deleted before it read it (skipped).
func (s *Server) Tail(ctx context.Context, f TailFilter, fn func(Message) error) error {
	r := s.rlog.NewReader(s.rlog.End())
	defer r.Close()
	for {
		off, p, err := r.Next(ctx)
		var te *TrimmedError
		switch {
		case errors.As(err, &te):
			continue
		case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded), errors.Is(err, ErrLogClosed):
			return nil
		case err != nil:
			return err
		}
		h, err := recordHeader(p)
		if err != nil || !f.matches(h.device, h.module) {
			continue
		}
		m, err := decodeRecord(off, p)
		if err != nil {
			continue
		}
		if err := fn(m); err != nil {
			return err
		}
	}
}
