// Package routing is the device hub's route language: Azure IoT Edge's
// routes, `[SELECT *] FROM <source> [WHERE <condition>] INTO <sink>`,
// compiled once and evaluated per message.
//
// It follows edgeHub's own implementation (Microsoft.Azure.Devices.Routing.Core:
// the ANTLR grammars GrammarLexer.g4, Condition.g4 and Route.g4, and
// ConditionVisitor's typing), so that a route means here what it means on
// Azure IoT Edge:
//
//   - Lexing is longest-match, as ANTLR's: a name may hold '-', '+', '*', '!'
//     and '.', so "temp-1" is one name and arithmetic needs spaces; a number
//     may start with '-'.
//   - A bare name is an application property; "$name" is an application
//     property of that exact name if the message has one, else the system
//     property "name" ($contentType, $connectionModuleId, ...), or for
//     "$body.a.b[0]" a query of the JSON body (contentType application/json,
//     contentEncoding utf-8). "{$name}" skips the application property.
//     Property names are matched ignoring case.
//   - Types are checked when the route compiles: properties are strings,
//     literals have their type, $body queries are dynamic. "temperature > 30"
//     on an application property is an error (compare with a string, or use
//     as_number); "$body.temperature > 30" is fine.
//   - Logic is three-valued: a missing property is undefined, a comparison
//     with it undefined, and a route matches only when its condition is true.
//   - Operator precedence, lowest first: "??", OR, AND, "= != <>",
//     "< <= > >=", "+ - ||", "* / %"; prefix '-' and NOT bind tighter than
//     all of them, so NOT a = b is (NOT a) = b.
//   - Functions: abs, exp, power, square, ceiling, floor, sign, sqrt,
//     as_number, is_bool, is_defined, is_null, is_number, is_string, concat,
//     length, lower, upper, substring, index_of, starts_with, ends_with,
//     contains.
//
// Where edgeHub is lenient by accident this package is stricter: anything
// after the sink is an error (edgeHub ignores it), a source must be one of
// the documented forms, and a BrokeredEndpoint address must be exactly
// /modules/<module>/inputs/<input>. Errors are *SyntaxError with a 1-based
// column, wrapped in *RouteError with the route's name by ParseRoutes.
//
// The package imports only the standard library, so that fleet can
// validate routes when a deployment is created.
package routing
