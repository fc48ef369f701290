package api

import (
	"context"
	"io"
	"net/http"
	"slices"
	"strings"

	"appliance/fleet"
)

// RolloutBackend is what the rollout routes need: a rollout's status and
// the operator's actions on it.
type RolloutBackend interface {
	// RolloutStatus is where a deployment's rollout stands (fleet.ErrNotFound
	// when the deployment has none).
	RolloutStatus(ctx context.Context, id string, consistent bool) (fleet.RolloutStatus, error)
	// RolloutAction pauses, resumes, promotes, aborts or rolls back a
	// rollout, and returns its status after the change.
	RolloutAction(ctx context.Context, id string, req RolloutActionRequest) (fleet.RolloutStatus, error)
}

// RolloutActions are the operator's actions on a rollout, as in
// POST /deployments/{id}/rollout/{action}.
var RolloutActions = []string{fleet.RolloutPause, fleet.RolloutResume, fleet.RolloutPromote, fleet.RolloutAbort, fleet.RolloutRollback}

// RolloutActionRequest is an action on a rollout: the action from the path,
// the reason from the optional body ({"reason": "..."}).
type RolloutActionRequest struct {
	Action string `json:"-"`
	Reason string `json:"reason,omitempty"`
}

func (s *Server) rolloutRoutes() {
	s.mux.Handle("GET /api/v1/deployments/{id}/rollout", s.auth(s.rolloutStatus))
	s.mux.Handle("POST /api/v1/deployments/{id}/rollout/{action}", s.auth(s.rolloutAction))
}

func (s *Server) rolloutStatus(w http.ResponseWriter, r *http.Request) {
	st, err := s.cfg.Backend.RolloutStatus(r.Context(), r.PathValue("id"), consistent(r))
	s.reply(w, r, st, err)
}

func (s *Server) rolloutAction(w http.ResponseWriter, r *http.Request) {
	req := RolloutActionRequest{Action: r.PathValue("action")}
	if !slices.Contains(RolloutActions, req.Action) {
		s.fail(w, r, fleet.Invalid("action", "must be one of %s; got %q", strings.Join(RolloutActions, ", "), req.Action))
		return
	}
	if r.ContentLength != 0 {
		if !s.decode(w, r, &req) {
			return
		}
	} else {
		_, _ = io.Copy(io.Discard, r.Body)
	}
	st, err := s.cfg.Backend.RolloutAction(r.Context(), r.PathValue("id"), req)
	s.reply(w, r, st, err)
}

// RolloutStatus reads where a deployment's rollout stands.
func (c *Client) RolloutStatus(ctx context.Context, id string, consistent bool) (fleet.RolloutStatus, error) {
	var st fleet.RolloutStatus
	_, err := c.do(ctx, http.MethodGet, "/api/v1/deployments/"+esc(id)+"/rollout", consistentQuery(consistent), WriteOptions{}, nil, &st)
	return st, err
}

// RolloutAction pauses, resumes, promotes, aborts or rolls back a rollout.
func (c *Client) RolloutAction(ctx context.Context, id, action, reason string) (fleet.RolloutStatus, error) {
	var st fleet.RolloutStatus
	_, err := c.do(ctx, http.MethodPost, "/api/v1/deployments/"+esc(id)+"/rollout/"+esc(action), nil, WriteOptions{},
		RolloutActionRequest{Reason: reason}, &st)
	return st, err
}
