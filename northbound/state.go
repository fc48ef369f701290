package northbound

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The consumers' sessions and their streams' places survive a restart of
// the node, in sessions.db (bbolt): a session's subscriptions are written
// (and synced) before its SUBACK, a stream's place at most a second after
// it moves (and at Close). After a crash a stream resumes up to a second
// behind: its consumer gets those messages again (at-least-once).
var (
	bucketSessions = []byte("sessions")
	bucketStreams  = []byte("streams")
)

type stateStore struct{ db *bolt.DB }

func openState(path string) (*stateStore, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("open the consumers' sessions %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketSessions, bucketStreams} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open the consumers' sessions %s: %w", path, err)
	}
	return &stateStore{db: db}, nil
}

func (st *stateStore) close() error { return st.db.Close() }

// sessionRecord is a persistent session as stored.
type sessionRecord struct {
	Consumer     string      `json:"consumer"`
	ClientID     string      `json:"clientId"`
	ExpirySecs   uint32      `json:"expirySecs"`
	Subs         []subRecord `json:"subs,omitempty"`
	Disconnected time.Time   `json:"disconnected,omitzero"`
}

type subRecord struct {
	Filter string `json:"filter"`
	Group  string `json:"group,omitempty"`
	QoS    byte   `json:"qos"`
}

func (k sessionKey) bytes() []byte { return []byte(k.consumer + "\x00" + k.clientID) }

func (st *stateStore) putSession(k sessionKey, rec sessionRecord) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return st.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketSessions).Put(k.bytes(), data) })
}

func (st *stateStore) deleteSession(k sessionKey, streams []string) error {
	return st.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketSessions).Delete(k.bytes()); err != nil {
			return err
		}
		for _, id := range streams {
			if err := tx.Bucket(bucketStreams).Delete([]byte(id)); err != nil {
				return err
			}
		}
		return nil
	})
}

func (st *stateStore) deleteStreams(ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	return st.db.Update(func(tx *bolt.Tx) error {
		for _, id := range ids {
			if err := tx.Bucket(bucketStreams).Delete([]byte(id)); err != nil {
				return err
			}
		}
		return nil
	})
}

// putCursors stores streams' places.
func (st *stateStore) putCursors(cursors map[string]uint64) error {
	if len(cursors) == 0 {
		return nil
	}
	return st.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketStreams)
		for id, c := range cursors {
			var v [8]byte
			binary.BigEndian.PutUint64(v[:], c)
			if err := b.Put([]byte(id), v[:]); err != nil {
				return err
			}
		}
		return nil
	})
}

// load reads every session and stream place.
func (st *stateStore) load() (sessions []sessionRecord, cursors map[string]uint64, err error) {
	cursors = map[string]uint64{}
	err = st.db.View(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketSessions).ForEach(func(k, v []byte) error {
			var rec sessionRecord
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("session %q: %w", k, err)
			}
			sessions = append(sessions, rec)
			return nil
		}); err != nil {
			return err
		}
		return tx.Bucket(bucketStreams).ForEach(func(k, v []byte) error {
			if len(v) != 8 {
				return fmt.Errorf("stream %q: a place of %d bytes", k, len(v))
			}
			cursors[string(k)] = binary.BigEndian.Uint64(v)
			return nil
		})
	})
	if err != nil {
		return nil, nil, fmt.Errorf("read the consumers' sessions: %w (delete sessions.db in the events directory to start without them)", err)
	}
	return sessions, cursors, nil
}
